#!/usr/bin/env python3
"""Long context on this CPU: prefill time, tokens/s, % of the float32 matmul peak and peak RSS
against prompt length, and the decode step against context.

Model: the ``bench`` preset's shapes (``configs/bench.json``: hidden 1024, 16 query heads of 128
sharing one K/V head, 48 experts top-3 + a shared expert) cut to 2 layers (layer 0 dense, layer 1
MoE), ``max_position_embedding`` ``--max-position`` (65536), float32, seeded random weights,
loaded by ``step3_jax.load`` from a config written to a temporary directory.

1. Peak: a jitted float32 ``[N, N] @ [N, N]`` matmul (``--peak-size``), best of 10 runs after a
   warm-up (``tools/bench_attention.py``'s timing), at the start, between prefill and decode, at
   the end, and in every prefill child after its runs; % of peak uses the best of them all (other
   load only ever lowers a peak; a row's own peak shows how loaded the machine was then).
2. Prefill: each prompt length of ``--prefill`` in a fresh child process (this script with a
   hidden flag), so its peak RSS (``VmHWM``, the process's own high-water mark; ``ru_maxrss`` is
   recorded beside it) is that length's alone. The child loads the weights, reads its RSS (the
   baseline), then prefills one random prompt through ``Generator`` with ``max_new_tokens=1``:
   compile (``Generator`` compiles ahead of time, so ``compile_s`` is apart from the runs) and
   ``--repeats`` runs, a second run dropped once one took ``--repeat-max-s``. Chunked with
   ``--chunk`` (``DEFAULT_PREFILL_CHUNK``), and for comparison the whole prompt at once
   (``prefill_chunk=0``) for lengths above the chunk up to ``--whole-max`` (at or below the chunk
   the two are one program). A child that passes ``--child-timeout`` is killed and its row keeps
   the figures it had reported (e.g. the compile time and the first run).
   FLOPs: ``2 x (activated parameters - LM head)`` per token (``weights.count_params``:
   projections, dense FFN, shared expert, top-3 of 48 routed experts, router; the input
   embedding is a gather) plus the LM head once per sequence (prefill computes logits at the
   last token only), plus causal attention as half the square: ``2 x 2 x heads x head_dim x
   T^2 / 2`` per layer.
3. Decode: the ``Generator``'s decode loop (the jitted ``while_loop``, state donated;
   ``tools/bench_decode.py``'s ``Ours``) for ``--decode-steps`` steps from a KV cache of capacity
   ``C`` filled with random values up to ``C - steps`` (no prefill: 64K tokens of it would take
   longer than the whole benchmark), batch rows sharing that cache and decoding from their own
   random tokens. Attention ``auto`` (the kernel ``attention.resolve_impl`` picks is recorded)
   and, where ``auto`` picks the blocked kernel and the plain score array fits ``--plain-max-gb``,
   ``plain`` for comparison. Step = best of ``--decode-repeats`` runs / steps.

    python tools/bench_long_context.py                          # markdown on stdout
    python tools/bench_long_context.py --json --plot docs/long_context.png > docs/long_context.json
    python tools/bench_long_context.py --render docs/long_context.json --plot docs/long_context.png
    python tools/bench_long_context.py --prefill 65536 --decode 65536 --batches 1   # 64K only

The default run (prefill 1K-32K, decode 4K-64K at batch 1 and 16) took 53 minutes on this 2-core
machine at load average 5-8 from other jobs (about 21 of them compiling: 22 programs; 7 the 32K
prefill); on quiet cores expect a quarter to a third of that. ``--prefill``, ``--decode``,
``--batches``, ``--whole-max 0`` and ``--no-decode`` cut it down.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step3_jax  # noqa: E402
from bench_attention import matmul_peak_gflops  # noqa: E402
from bench_decode import Ours  # noqa: E402
from step3_jax.model.attention import resolve_impl  # noqa: E402
from step3_jax.model.cache import KVCache  # noqa: E402
from step3_jax.model.config import presets_dir  # noqa: E402
from step3_jax.model.weights import count_params  # noqa: E402
from step3_jax.runtime.bench import cpu_model, csv_ints, loadavg  # noqa: E402
from step3_jax.runtime.generate import DEFAULT_PREFILL_CHUNK, Generator  # noqa: E402

GB = 1e9
TARGETS = {"prefill_8k_peak_fraction": 0.40, "peak_rss_32k_bytes": 4 * GB}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ----- the model ----------------------------------------------------------------------------------

def write_config(directory: str, max_position: int) -> str:
    """The bench preset cut to 2 layers (0 dense, 1 MoE) with a long context, as a config.json."""
    raw = json.loads((presets_dir() / "bench.json").read_text())
    raw.update(_name_or_path="bench-2layer", num_hidden_layers=2, moe_layers_enum="1",
               max_position_embedding=max_position)
    raw.pop("_comment", None)
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump(raw, f)
    return path


def load_model(max_position: int, seed: int):
    with tempfile.TemporaryDirectory() as tmp:
        return step3_jax.load(config=write_config(tmp, max_position), seed=seed, progress=False)


def prefill_flops(cfg, tokens: int) -> dict:
    """Prefill FLOPs of one ``tokens``-token sequence (module docstring, 2.)."""
    head = cfg.vocab_size * cfg.hidden_size
    dense = 2 * (count_params(cfg)["activated"] - head) * tokens + 2 * head
    attn = cfg.num_hidden_layers * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * tokens ** 2 / 2
    return {"dense": dense, "attention": attn, "total": dense + attn}


# ----- prefill, one length per child process ------------------------------------------------------

def rss() -> dict:
    """This process's resident set now and at its peak (``/proc/self/status``), in bytes."""
    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def child(args) -> int:
    """One prefill row: JSON lines on stdout as figures come in (the parent keeps the last)."""
    t_len, chunk = (int(x) for x in args.child.split(":"))
    row = {"T": t_len, "chunk": chunk, "loadavg_start": loadavg()}

    def emit():
        print(json.dumps(row), flush=True)

    params, cfg = load_model(args.max_position, args.seed)
    row["baseline_rss"] = rss()["VmRSS"]
    gen = Generator(params, cfg, prefill_chunk=chunk)
    # The attention kernel of a prefill piece (over T keys: the cache, or the whole prompt).
    piece = chunk if chunk and t_len > chunk else t_len
    row["attention"] = resolve_impl(cfg, 1, piece, cfg.num_attention_heads, t_len)
    prompt = np.random.default_rng(args.seed).integers(2, cfg.vocab_size, size=t_len).tolist()
    runs = row["runs_s"] = []
    for i in range(args.repeats):
        _, m = gen([prompt], max_new_tokens=1, eos_ids=[])
        if i == 0:
            row["compile_s"], row["prefill_chunk_used"] = m["compile_s"], m["prefill_chunk"]
        runs.append(m["prefill_ms"] / 1e3)
        row.update(rss())
        emit()
        log(f"  prefill T={t_len} chunk={chunk}: run {i + 1} {runs[-1]:.2f} s "
            f"(compile {row['compile_s']:.1f} s), peak RSS {row['VmHWM'] / GB:.2f} GB")
        if runs[-1] >= args.repeat_max_s:
            break
    row["peak_gflops"] = matmul_peak_gflops(args.peak_size)  # after the RSS is read
    row["loadavg_end"] = loadavg()
    emit()
    return 0


def run_child(t_len: int, chunk: int, args) -> dict:
    """Run one prefill row in a fresh process; its last reported figures (and any failure)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{t_len}:{chunk}",
           "--max-position", str(args.max_position), "--seed", str(args.seed),
           "--repeats", str(args.repeats), "--repeat-max-s", str(args.repeat_max_s),
           "--peak-size", str(args.peak_size)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # stderr: ours (progress)
    try:
        out, _ = proc.communicate(timeout=args.child_timeout)
        error = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        error = f"killed after --child-timeout {args.child_timeout:.0f} s"
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    row = json.loads(lines[-1]) if lines else {"T": t_len, "chunk": chunk}
    row["wall_s"] = time.perf_counter() - started
    if error:
        row["error"] = error
        log(f"  prefill T={t_len} chunk={chunk}: {error}")
    return row


def derive_prefill(row: dict, cfg, peak: float) -> dict:
    flops = prefill_flops(cfg, row["T"])
    row["flops"] = flops
    if row.get("runs_s"):
        best = min(row["runs_s"])
        row["prefill_s"], row["tokens_per_s"] = best, row["T"] / best
        row["gflops"] = flops["total"] / best / 1e9
        row["peak_fraction"] = row["gflops"] / peak
    return row


# ----- decode -------------------------------------------------------------------------------------

def random_prefix(cfg, capacity: int, filled: int, seed: int) -> KVCache:
    """A batch-1 KV cache of ``capacity`` slots, the first ``filled`` of them in use, holding
    unit-normal values (what a prefill would leave, as far as the decode's cost goes)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * cfg.num_hidden_layers)
    k = tuple(jax.random.normal(keys[2 * i], (1, cfg.head_dim, capacity), jnp.float32)
              for i in range(cfg.num_hidden_layers))
    v = tuple(jax.random.normal(keys[2 * i + 1], (1, capacity, cfg.head_dim), jnp.float32)
              for i in range(cfg.num_hidden_layers))
    return KVCache(k=k, v=v, lengths=jnp.asarray([filled], jnp.int32))


def bench_decode(params, cfg, args) -> list[dict]:
    steps, rows = args.decode_steps, []
    rng = np.random.default_rng(args.seed)
    decoders = {}
    for capacity in args.decode:
        prefix = random_prefix(cfg, capacity, capacity - steps, args.seed)
        for batch in args.batches:
            first = rng.integers(2, cfg.vocab_size, size=batch)
            picked = resolve_impl(cfg, batch, 1, cfg.num_attention_heads, capacity)
            impls = ["auto"]
            scores = 4 * batch * cfg.num_attention_heads * capacity
            if picked != "plain" and scores <= args.plain_max_gb * GB:
                impls.append("plain")
            row = {"context": capacity, "batch": batch, "steps": steps, "auto_picks": picked,
                   "filled_start": capacity - steps, "loadavg": loadavg()}
            for impl in impls:
                if impl not in decoders:
                    decoders[impl] = Ours(params, cfg.replace(attention_impl=impl))
                ours = decoders[impl]
                _, _, compile_s = ours.decode(prefix, first, steps)  # compiles, warms up
                runs = [ours.decode(prefix, first, steps)[0] / steps
                        for _ in range(args.decode_repeats)]
                row[impl] = {"compile_s": compile_s, "runs_ms": [1e3 * t for t in runs],
                             "step_ms": 1e3 * min(runs), "tokens_per_s": batch / min(runs)}
                log(f"  decode C={capacity} B={batch} {impl}"
                    f"{' (' + picked + ')' if impl == 'auto' else ''}: "
                    f"{row[impl]['step_ms']:.1f} ms/step (compile {compile_s:.1f} s)")
            rows.append(row)
        del prefix
    return rows


# ----- report -------------------------------------------------------------------------------------

def fmt(x, spec=".1f", suffix="") -> str:
    return "—" if x is None else format(x, spec) + suffix


def load_str(load) -> str:
    return "?" if not load else ", ".join(f"{x:.2f}" for x in load)


def prefill_markdown(rows: list[dict]) -> list[str]:
    out = ["| prompt | chunk | attention | compile s | prefill s | tokens/s | TFLOP (attn) "
           "| GFLOP/s | % of peak | row's peak | RSS after load | peak RSS | growth | runs "
           "| load (1 min) |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        chunk = (r["chunk"] if r["chunk"] and r["T"] > r["chunk"] else
                 f"{r['chunk']} (= whole)" if r["chunk"] else "whole")
        hwm, base = r.get("VmHWM"), r.get("baseline_rss")
        runs = ", ".join(f"{t:.2f}" for t in r.get("runs_s", []))
        if r.get("error"):
            runs += ("; " if runs else "") + r["error"]
        pct = r.get("peak_fraction")
        load = (r.get("loadavg_end") or r.get("loadavg_start") or [None])[0]
        out.append(
            f"| {r['T']} | {chunk} | {r.get('attention', '?')} | {fmt(r.get('compile_s'))} "
            f"| {fmt(r.get('prefill_s'), '.2f')} | {fmt(r.get('tokens_per_s'), '.0f')} "
            f"| {r['flops']['total'] / 1e12:.2f} ({r['flops']['attention'] / 1e12:.2f}) "
            f"| {fmt(r.get('gflops'))} | {fmt(None if pct is None else 100 * pct, '.0f', '%')} "
            f"| {fmt(r.get('peak_gflops'), '.0f')} "
            f"| {fmt(None if base is None else base / GB, '.2f', ' GB')} "
            f"| {fmt(None if hwm is None else hwm / GB, '.2f', ' GB')} "
            f"| {fmt(None if hwm is None else (hwm - base) / GB, '.2f', ' GB')} "
            f"| {runs} | {fmt(load, '.2f')} |")
    return out


def decode_markdown(rows: list[dict]) -> list[str]:
    out = ["| context | batch | auto picks | auto ms/step | auto tokens/s | plain ms/step "
           "| plain / auto | load (1 min) |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        plain = r.get("plain", {}).get("step_ms")
        auto = r["auto"]["step_ms"]
        if plain is None and r["auto_picks"] == "plain":
            plain_s, ratio = "(= auto)", "—"
        else:
            plain_s = fmt(plain, ".1f")
            ratio = fmt(None if plain is None else plain / auto, ".2f", "×")
        out.append(f"| {r['context']} | {r['batch']} | {r['auto_picks']} | {auto:.1f} "
                   f"| {r['auto']['tokens_per_s']:.1f} | {plain_s} | {ratio} "
                   f"| {fmt((r.get('loadavg') or [None])[0], '.2f')} |")
    return out


def markdown(doc: dict) -> str:
    m = doc["model"]
    peaks = ", ".join(f"{p:.0f}" for p in doc["peak_gflops_runs"])
    child = ", ".join(f"{r['peak_gflops']:.0f}" for r in doc["prefill"] if r.get("peak_gflops"))
    out = [f"# Long context ({doc['date']})", "",
           f"- machine: {doc['cpu']}, {doc['cpus']} CPUs, jax {doc['jax']} ({doc['backend']})",
           f"- load average (1/5/15 min): start {load_str(doc['load_start'])}, after prefill "
           f"{load_str(doc['load_mid'])}, end {load_str(doc['load_end'])}",
           f"- model: {m['name']}: {m['layers']} layers ({m['moe_layers']} MoE), hidden "
           f"{m['hidden']}, {m['heads']} heads of {m['head_dim']} (one shared K/V head), "
           f"{m['experts']} experts top-{m['top_k']}, max_position_embedding "
           f"{m['max_position']}, {m['dtype']}, {m['params_total'] / 1e6:.0f}M parameters "
           f"({m['params_activated'] / 1e6:.1f}M activated, LM head included)",
           f"- float32 matmul peak ({doc['peak_size']}^3, best of 10; start / mid / end): {peaks}"
           f" GFLOP/s; in the prefill children: {child or '—'}; best: "
           f"**{doc['peak_gflops']:.0f} GFLOP/s** (% of peak uses it)", "",
           "## Prefill (one sequence; compile apart; prefill s = best run)", ""]
    out += prefill_markdown(doc["prefill"])
    out += ["", "## Decode step against context (`Generator` decode loop, random KV cache, "
            f"{doc['decode_steps']} steps, best of {doc['decode_repeats']} runs)", ""]
    out += decode_markdown(doc["decode"]) if doc["decode"] else ["(none)"]
    return "\n".join(out) + "\n"


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ok = [r for r in doc["prefill"] if r.get("prefill_s")]
    chunked = [r for r in ok if r["chunk"]]  # at or below the chunk: one program, both lines
    whole = [r for r in ok if not r["chunk"] or r["T"] <= r["chunk"]]
    for rows, style, label in ((chunked, "o-", f"chunked ({doc['chunk']})"),
                               (whole, "s--", "whole prompt")):
        if rows:
            axes[0].plot([r["T"] for r in rows], [r["prefill_s"] for r in rows], style,
                         label=label)
    axes[0].set_title("prefill time")
    axes[0].set_ylabel("seconds")
    for rows, style, label in ((chunked, "o-", f"chunked ({doc['chunk']})"),
                               (whole, "s--", "whole prompt")):
        rows = [r for r in rows if r.get("VmHWM")]
        if rows:
            axes[1].plot([r["T"] for r in rows], [r["VmHWM"] / GB for r in rows], style,
                         label=f"peak, {label}")
    base = [r for r in doc["prefill"] if r.get("baseline_rss") and r["chunk"]]
    if base:
        axes[1].plot([r["T"] for r in base], [r["baseline_rss"] / GB for r in base], "k:",
                     label="after loading the weights")
    axes[1].set_title("peak RSS (one child process per length)")
    axes[1].set_ylabel("GB")
    axes[1].set_ylim(bottom=0)
    for batch in sorted({r["batch"] for r in doc["decode"]}):
        rows = [r for r in doc["decode"] if r["batch"] == batch]
        axes[2].plot([r["context"] for r in rows], [r["auto"]["step_ms"] for r in rows], "o-",
                     label=f"batch {batch}, auto")
        plain = [r for r in rows if "plain" in r]
        if plain:
            axes[2].plot([r["context"] for r in plain], [r["plain"]["step_ms"] for r in plain],
                         "x--", label=f"batch {batch}, plain")
    axes[2].set_title("decode step")
    axes[2].set_ylabel("ms / step")
    for ax, xlabel in zip(axes, ("prompt tokens", "prompt tokens", "context (cache slots)")):
        ax.set_xscale("log", base=2)
        ticks = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
        ax.set_xticks(ticks, [f"{x // 1024}K" if x >= 1024 else str(x) for x in ticks])
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(f"{doc['model']['name']} ({doc['model']['layers']} layers), float32, "
                 f"{doc['cpus']} cores, load {load_str(doc['load_start'])} at start; "
                 f"matmul peak {doc['peak_gflops']:.0f} GFLOP/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main ---------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="See the module docstring (python -m pydoc tools/bench_long_context.py) for "
               "what each figure measures.")
    ap.add_argument("--prefill", type=csv_ints, default=csv_ints("1024,2048,4096,8192,16384,32768"),
                    help="prompt lengths prefilled, each in its own process (65536 allowed)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill rows")
    ap.add_argument("--chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                    help="prefill chunk (Generator's default)")
    ap.add_argument("--whole-max", type=int, default=8192,
                    help="also prefill the whole prompt at once (prefill_chunk=0) for lengths "
                         "above --chunk up to this (0: never)")
    ap.add_argument("--repeats", type=int, default=2, help="prefill runs per length (best kept)")
    ap.add_argument("--repeat-max-s", type=float, default=90.0,
                    help="no further prefill run once one took this many seconds")
    ap.add_argument("--child-timeout", type=float, default=1200.0,
                    help="kill a prefill child after this many seconds (its figures so far stay)")
    ap.add_argument("--decode", type=csv_ints, default=csv_ints("4096,16384,32768,65536"),
                    help="decode contexts (KV cache capacities)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode rows")
    ap.add_argument("--batches", type=csv_ints, default=csv_ints("1,16"), help="decode batches")
    ap.add_argument("--decode-steps", type=int, default=8, help="decode steps per timed run")
    ap.add_argument("--decode-repeats", type=int, default=3, help="timed decode runs (best kept)")
    ap.add_argument("--plain-max-gb", type=float, default=4.0,
                    help="time plain decode for comparison only if its scores fit this")
    ap.add_argument("--max-position", type=int, default=65536,
                    help="the model's max_position_embedding")
    ap.add_argument("--peak-size", type=int, default=2048, help="N of the N^3 peak matmul")
    ap.add_argument("--seed", type=int, default=0, help="weights, prompts, caches")
    ap.add_argument("--json", action="store_true",
                    help="exactly one JSON document on stdout (progress on stderr)")
    ap.add_argument("--plot", default=None, metavar="FILE.png",
                    help="prefill time and peak RSS vs prompt length, decode step vs context")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="measure nothing: print the markdown of a saved --json document "
                         "(and write --plot)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "T:CHUNK", internal
    args = ap.parse_args(argv)
    too_long = [t for t in args.prefill + args.decode if t > args.max_position]
    if too_long:
        ap.error(f"length {too_long[0]} exceeds --max-position {args.max_position}")
    if args.decode_steps >= min(args.decode) or args.chunk < 0 or args.repeats < 1:
        ap.error("need --decode-steps < every decode context, --chunk >= 0, --repeats >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
    else:
        doc = measure(args)
    if args.plot:
        plot(doc, args.plot)
        log(f"plot written to {args.plot}")
    if args.json and not args.render:
        print(json.dumps(doc, indent=1))
        log(markdown(doc))
    else:
        print(markdown(doc))
    return 0


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = step3_jax.load_config(write_config(tmp, args.max_position))
    counts = count_params(cfg)
    doc = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "cpu": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__,
           "backend": jax.default_backend(), "load_start": loadavg(),
           "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
           "model": {"name": cfg.name, "layers": cfg.num_hidden_layers,
                     "moe_layers": len(cfg.moe_layers), "hidden": cfg.hidden_size,
                     "heads": cfg.num_attention_heads, "head_dim": cfg.head_dim,
                     "experts": cfg.moe_num_experts, "top_k": cfg.moe_top_k,
                     "max_position": cfg.max_position_embedding, "dtype": cfg.dtype,
                     "params_total": counts["total"], "params_activated": counts["activated"]},
           "chunk": args.chunk, "peak_size": args.peak_size, "decode_steps": args.decode_steps,
           "decode_repeats": args.decode_repeats, "targets": TARGETS}
    doc["peak_gflops_runs"] = [matmul_peak_gflops(args.peak_size)]
    log(f"matmul peak: {doc['peak_gflops_runs'][0]:.0f} GFLOP/s, load {doc['load_start']}")
    rows = []
    for t_len in [] if args.no_prefill else args.prefill:
        rows.append(run_child(t_len, args.chunk, args))
        if args.chunk and args.chunk < t_len <= args.whole_max:
            rows.append(run_child(t_len, 0, args))
    doc["load_mid"] = loadavg()
    doc["peak_gflops_runs"].append(matmul_peak_gflops(args.peak_size))
    doc["decode"] = []
    if not args.no_decode:
        params, cfg = load_model(args.max_position, args.seed)
        doc["decode"] = bench_decode(params, cfg, args)
        del params
    doc["peak_gflops_runs"].append(matmul_peak_gflops(args.peak_size))
    doc["load_end"] = loadavg()
    doc["peak_gflops"] = max(doc["peak_gflops_runs"]
                             + [r["peak_gflops"] for r in rows if r.get("peak_gflops")])
    doc["prefill"] = [derive_prefill(r, cfg, doc["peak_gflops"]) for r in rows]
    return doc


if __name__ == "__main__":
    sys.exit(main())
