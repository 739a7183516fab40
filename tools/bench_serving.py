#!/usr/bin/env python3
"""The paper's SLA measurement on this machine: `step3-jax serve`, colocated on one device and
AFD 2:2 on emulated devices, each swept with `step3-jax loadtest --sla-tpot`.

For each deployment in ``--deployments`` (``single``: one device; ``afd``: ``--afd 2:2``, FP8
A->F, 3 micro-batches, on 4 emulated CPU devices): start ``step3-jax serve --port 0`` with the
model and engine flags below, wait for ``/health`` (compiling included; the compile time is
recorded from the server's log), run one ``step3-jax loadtest --json`` sweep over
``--concurrencies`` (fixed concurrency: C clients sending back to back; the same seeded mix of
``--num-requests`` requests at every level) with ``--sla-tpot``, then SIGTERM the server and
check it exited 0. Around each: ``uptime``. Writes every sweep's JSON to ``--out DIR``
(``serving_<deployment>.json``), one plot of all curves (``--plot``), and a markdown summary on
stdout.

    python tools/bench_serving.py --out docs --plot docs/serving_sla.png
    python tools/bench_serving.py --deployments single --concurrencies 1,16 --num-requests 16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEPLOYMENTS = {"single": [], "afd": ["--afd", "2:2"]}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def start_server(flags: list[str], env: dict, timeout: float):
    proc = subprocess.Popen([sys.executable, "-m", "step3_jax.cli", "serve", "--port", "0",
                             *flags], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(lines)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}:\n{text}")
        ready = re.search(r"compiled in ([\d.]+) s; (http://\S+)/health answers 200", text)
        if ready:
            return proc, lines, ready.group(2), float(ready.group(1))
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server was not ready in time")


def run(args, name: str) -> dict:
    env = dict(os.environ)
    if name == "afd":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_force_host_platform_device_count=4").strip()
    flags = ["--config", args.config, "--max-model-len", str(args.max_model_len),
             "--prefill-chunk", str(args.prefill_chunk), "--page-size", str(args.page_size),
             "--max-num-seqs", str(args.max_num_seqs), "--max-queued", "1024",
             *DEPLOYMENTS[name]]
    log(f"[{name}] serve {' '.join(flags)}; {uptime()}")
    started = time.monotonic()
    proc, lines, url, compile_s = start_server(flags, env, args.start_timeout)
    log(f"[{name}] ready after {time.monotonic() - started:.0f} s ({compile_s:.0f} s compiling)")
    load_before = uptime()
    sweep = subprocess.run(
        [sys.executable, "-m", "step3_jax.cli", "loadtest", "--url", url, "--json", "-q",
         "--concurrencies", args.concurrencies, "--num-requests", str(args.num_requests),
         "--prompt-lens", args.prompt_lens, "--output-lens", args.output_lens,
         "--sla-tpot", str(args.sla_tpot), "--sla-percentile", str(args.sla_percentile),
         "--label", {"single": "1 device", "afd": "AFD 2:2"}[name]],
        capture_output=True, text=True)
    load_after = uptime()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    if sweep.returncode != 0:
        raise SystemExit(f"[{name}] loadtest failed: {sweep.stderr.strip()}")
    if code != 0:
        raise SystemExit(f"[{name}] the server exited {code} on SIGTERM:\n{''.join(lines)}")
    doc = json.loads(sweep.stdout)
    doc["bench"] = {"deployment": name, "serve_flags": flags, "compile_s": compile_s,
                    "uptime_before": load_before, "uptime_after": load_after,
                    "server_log": [x.rstrip() for x in lines if "compiling:" not in x
                                   and "restoring" not in x][:12]}
    (Path(args.out) / f"serving_{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def markdown(docs: list[dict]) -> str:
    out = []
    for doc in docs:
        b = doc["bench"]
        out.append(f"**{doc['label']}** (`step3-jax serve {' '.join(b['serve_flags'])}`; "
                   f"{b['compile_s']:.0f} s compiling; load before: "
                   f"{b['uptime_before'].split('load average: ')[-1]}, after: "
                   f"{b['uptime_after'].split('load average: ')[-1]})\n")
        out.append("| clients | done/failed | duration s | req/s | out tok/s | tok/s/device | "
                   "TTFT p50 ms | TPOT p50 ms | TPOT p90 ms | ITL p99 ms | e2e p90 ms | met SLA |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
        for lv in doc["levels"]:
            out.append(
                f"| {lv['load']['concurrency']} | {lv['completed']}/{lv['failed']} | "
                f"{lv['duration_s']:.1f} | {lv['request_throughput_per_s']:.2f} | "
                f"{lv['output_tokens_per_s']:.1f} | {lv['output_tokens_per_s_per_device']:.1f} | "
                f"{lv['ttft_ms_p50']:.0f} | {lv['tpot_ms_p50']:.1f} | {lv['tpot_ms_p90']:.1f} | "
                f"{lv['itl_ms_p99']:.0f} | {lv['e2e_ms_p90']:.0f} | "
                f"{'yes' if lv['met_sla'] else 'no'} |")
        peak = doc["peak"]
        out.append("")
        out.append("Peak meeting the SLA: " + (
            f"**{peak['output_tokens_per_s']:.1f} output tokens/s "
            f"({peak['output_tokens_per_s_per_device']:.1f} per device)** at "
            f"{peak['load']['concurrency']} clients." if peak else doc["message"]))
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deployments", default="single,afd")
    p.add_argument("--config", default="bench")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--concurrencies", default="1,2,4,8,16")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--prompt-lens", default="64:256")
    p.add_argument("--output-lens", default="32")
    p.add_argument("--sla-tpot", type=float, default=100.0)
    p.add_argument("--sla-percentile", type=float, default=90.0)
    p.add_argument("--start-timeout", type=float, default=1800)
    p.add_argument("--out", default=tempfile.gettempdir())
    p.add_argument("--plot", help="one PNG with every deployment's curve")
    p.add_argument("--render", action="store_true",
                   help="no runs: the markdown (and --plot) from --out's JSON files")
    args = p.parse_args(argv)
    names = args.deployments.split(",")
    if args.render:
        docs = [json.loads((Path(args.out) / f"serving_{n}.json").read_text()) for n in names]
    else:
        docs = [run(args, n) for n in names]
    if args.plot:
        from step3_jax.serving import sweep

        sweep.plot(docs, args.plot)
    print(markdown(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
