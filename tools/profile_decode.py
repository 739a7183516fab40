"""Where a decode step's time goes: a `jax.profiler` trace of the decode loop, summed by named scope.

Runs `step3-jax bench`'s setting (config, batch, prompt length, new tokens; random prompts,
greedy, float32), compiles, then traces one more generation. XLA:CPU records one event per
executed HLO op (with its `hlo_op` and `hlo_module`); each op of the decode executable is mapped
to the model's named scope (`mfa`, `moe_router`, `moe_experts`, `shared_expert`, `dense_ffn`,
`lm_head`; the rest — sampling, the loop's bookkeeping, cache writes outside a scope — is
`other`) through the `op_name` metadata of the compiled HLO. Times are *self* times (a loop or
conditional op's time excludes the ops it ran), summed over the traced decode steps and divided
by their number. Also reported per scope: the time in `copy` ops, which XLA:CPU inserts to
change a buffer's layout (BENCHMARKS.md).

    python tools/profile_decode.py --config bench --batch 1            # table on stderr
    python tools/profile_decode.py --config bench --batch 16 --json    # one JSON document

The ops' summed self time can exceed the wall time when XLA:CPU runs ops on several threads at
once; fractions are of the summed time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import time

import jax
import numpy as np

import step3_jax as s3
from step3_jax.runtime.generate import Generator

SCOPES = ("mfa", "moe_router", "moe_experts", "shared_expert", "dense_ffn", "lm_head")
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"')


def scope_of_ops(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the innermost known named scope of its ``op_name`` metadata.

    A fusion carries no metadata of its own in the optimized HLO: it takes the scope of the ops
    fused into it (the computation it ``calls``). Instructions with no metadata at all are left
    out (:func:`profile` then takes the scope of the op that ran before them)."""
    def scope(op_name: str) -> str:
        known = [p for p in op_name.split("/") if p in SCOPES]
        return known[-1] if known else "other"

    computation, fused_scope, out, calls = None, {}, {}, {}
    for line in hlo_text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            computation = header.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if not m:
            continue
        meta = re.search(r'op_name="([^"]*)"', line)
        if meta:
            out[m.group(1)] = scope(meta.group(1))
            known = out[m.group(1)]
            if known != "other" or computation not in fused_scope:
                fused_scope[computation] = known
        call = re.search(r"calls=%?([\w.\-]+)", line)
        if call and not meta:
            calls[m.group(1)] = call.group(1)
    for name, called in calls.items():
        if called in fused_scope:
            out[name] = fused_scope[called]
    return out


def self_times(events) -> list[tuple[object, float]]:
    """(event, self time in ns) for events on one thread line: nested events are subtracted."""
    events = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
    result, stack = [], []  # stack of [event, end, child_ns]
    for e in events:
        while stack and e.start_ns >= stack[-1][1]:
            done = stack.pop()
            result.append((done[0], done[0].duration_ns - done[2]))
        if stack:
            stack[-1][2] += e.duration_ns
        stack.append([e, e.start_ns + e.duration_ns, 0.0])
    result.extend((d[0], d[0].duration_ns - d[2]) for d in stack)
    return result


def profile(cfg_name: str, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    params, cfg = s3.load(config=cfg_name, seed=seed, progress=False)
    gen = Generator(params, cfg)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(2, cfg.vocab_size, (batch, prompt_len)).tolist()
    run = lambda: gen(prompts, max_new_tokens=new_tokens, eos_ids=[-1])  # noqa: E731
    run()  # compile
    _, metrics = run()  # a warm run: its wall-clock step time
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run()
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    (name, key), executable = next((k, v) for k, v in gen._compiled.items() if k[0] == "decode")
    scopes = scope_of_ops(executable.as_text())
    module = None
    per_scope = collections.Counter()
    copies = collections.Counter()
    inferred = 0.0
    for plane in data.planes:
        for line in plane.lines:
            ops = [e for e in line.events if "hlo_op" in dict(e.stats)]
            previous = "other"
            for event, self_ns in sorted(self_times(ops), key=lambda x: x[0].start_ns):
                stats = dict(event.stats)
                if "decode" not in str(stats.get("hlo_module", "")):
                    continue
                module = stats["hlo_module"]
                scope = scopes.get(stats["hlo_op"])
                if scope is None:  # no metadata: the scope of the op that ran just before
                    scope, inferred = previous, inferred + self_ns
                previous = scope
                per_scope[scope] += self_ns
                if stats["hlo_op"].startswith("copy"):
                    copies[scope] += self_ns
    if module is None:
        raise SystemExit("profile_decode: no decode-loop ops in the trace")
    steps = new_tokens - 1
    total = sum(per_scope.values())
    rows = {s: {"ms_per_step": per_scope[s] / 1e6 / steps,
                "fraction": per_scope[s] / total,
                "copy_ms_per_step": copies[s] / 1e6 / steps}
            for s in sorted(per_scope, key=per_scope.get, reverse=True)}
    return {"config": cfg_name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "decode_steps": steps, "hlo_module": module, "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_step_ms": metrics["decode_step_ms"], "ops_ms_per_step": total / 1e6 / steps,
            "inferred_fraction": inferred / total,
            "scopes": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", help="preset or config.json (default bench)")
    parser.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per sequence (32)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    out = profile(args.config, args.batch, args.prompt_len, args.new_tokens)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['config']} batch {out['batch']}, prompt {out['prompt_len']}: wall "
          f"{out['wall_step_ms']:.2f} ms/step, ops {out['ops_ms_per_step']:.2f} ms/step "
          f"(self time summed over threads; {100 * out['inferred_fraction']:.0f}% of it in ops "
          "without metadata, given the scope of the op before them)", file=sys.stderr)
    print(f"{'scope':15s} {'ms/step':>8s} {'share':>6s} {'of which copies':>16s}", file=sys.stderr)
    for scope, r in out["scopes"].items():
        print(f"{scope:15s} {r['ms_per_step']:8.2f} {100 * r['fraction']:5.1f}% "
              f"{r['copy_ms_per_step']:13.2f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
