#!/usr/bin/env python
"""Benchmark one routed-MoE layer of the ``bench`` preset against the machine's memory roofline.

Everything is measured in one run, so the figures share one machine state:

1. Roofline: median time of a jitted float32 ``[1, 8192] @ [8192, 8192]`` matvec, giving the GB/s
   of weight read that a batch-1 decode can hope for.
2. For each batch size and each expert kernel (``cfg.moe_impl``: ``loop`` for XLA:CPU,
   ``ragged`` for GPU/TPU): median wall time of a jitted ``step3_jax.model.moe.routed_experts`` with the
   routing computed once outside the timed function (``step3_jax.model.moe.route`` with a random router),
   the bytes of the *distinct* experts the batch touches (gate + up + down, ``H * Fe`` each),
   the ideal time ``bytes / roofline`` and the fraction of roofline ``ideal / measured``.
3. Expert doubling: the loop kernel at batch 1 with ``E`` and ``2E`` experts (same top-k), whose
   step-time ratio should stay within 15%: the cost must follow the activated experts, not the
   total.

The roofline is measured again at the end of the run and its drift reported: this is a small
shared machine, and a change of bandwidth during the run (other load) makes the fractions suspect.

Between timed runs a buffer larger than the last-level cache is rewritten (``--flush-mb``), so
every run reads its weights from DRAM as a real decode step does (a model's experts do not stay
cached from one token to the next); ``--flush-mb 0`` disables it.

    python tools/bench_moe.py                      # human-readable table on stderr
    python tools/bench_moe.py --json > moe.json    # one JSON document on stdout, logs on stderr
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from step3_jax.model.config import load_config
from step3_jax.model.moe import route, routed_experts
from step3_jax.model.weights import Mlp, Moe
from step3_jax.runtime.bench import Flusher, cpu_model, csv_ints, loadavg, roofline, time_fn

# "loop" runs on the per-expert layout the model loads on CPU (weights.unstack_experts);
# "loop_stacked" is the same kernel on stacked [E, ...] experts, to show what the layout buys.
IMPLS = ("loop", "loop_stacked", "ragged")


def kernel_inputs(impl: str, p: Moe) -> Moe:
    if impl == "loop":
        return p.replace(gate=tuple(p.gate), up=tuple(p.up), down=tuple(p.down))
    return p
DOUBLING_TARGET = 0.15


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def csv_impls(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in IMPLS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"impls must be among {','.join(IMPLS)}; got {text!r}")
    return values


def make_moe(key, hidden: int, experts: int, width: int, shared_width: int) -> Moe:
    """Random ``Moe`` params at the declared shapes ([out, in], experts stacked on axis 0)."""
    k = jax.random.split(key, 7)

    def normal(key, shape, fan_in, scale=1.0):
        return (scale / math.sqrt(fan_in)) * jax.random.normal(key, shape, jnp.float32)

    return Moe(
        router=normal(k[0], (experts, hidden), hidden, scale=2.0),
        gate=normal(k[1], (experts, width, hidden), hidden),
        up=normal(k[2], (experts, width, hidden), hidden),
        down=normal(k[3], (experts, hidden, width), width),
        shared=Mlp(gate=normal(k[4], (shared_width, hidden), hidden),
                   up=normal(k[5], (shared_width, hidden), hidden),
                   down=normal(k[6], (hidden, shared_width), shared_width)),
    )


def routed_inputs(cfg, p: Moe, batch: int, seed: int):
    y = jax.random.normal(jax.random.PRNGKey(seed + 1000 + batch), (batch, cfg.hidden_size),
                          jnp.float32)
    weights, idx = jax.jit(route, static_argnums=2)(y, p.router, cfg)
    return jax.block_until_ready((y, weights, idx))


def expert_fn(cfg):
    return jax.jit(lambda y, w, i, p: routed_experts(y, w, i, p, cfg))


# ----- main ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Time one routed-MoE layer (bench preset shape) per batch size and expert "
                    "kernel against the memory roofline measured in the same run.")
    ap.add_argument("--json", action="store_true",
                    help="print exactly one JSON document on stdout (logs go to stderr)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median)")
    ap.add_argument("--batches", type=csv_ints, default=[1, 16, 64],
                    help="comma-separated batch sizes (tokens per step)")
    ap.add_argument("--experts", type=int, default=48,
                    help="number of routed experts (the doubling check uses twice this)")
    ap.add_argument("--impls", type=csv_impls, default=list(IMPLS),
                    help="comma-separated expert kernels among loop,ragged")
    ap.add_argument("--config", default="bench", help="preset giving the layer shape")
    ap.add_argument("--ragged-budget", type=float, default=30.0,
                    help="seconds of timed ragged runs after which larger batches are skipped")
    ap.add_argument("--flush-mb", type=int, default=1024,
                    help="MiB rewritten between timed runs to evict the caches (0: no flush)")
    ap.add_argument("--no-doubling", action="store_true", help="skip the expert-doubling check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.experts < 1:
        ap.error("--repeats and --experts must be positive")

    base = load_config(args.config)
    if args.experts < base.moe_top_k:
        ap.error(f"--experts must be at least top_k={base.moe_top_k}")
    cfg = base.replace(moe_num_experts=args.experts, dtype="float32")
    H, Fe, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_top_k
    expert_bytes = 3 * H * Fe * 4

    setting = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
        "backend": jax.default_backend(), "date": _dt.datetime.now().astimezone().isoformat(
            timespec="seconds"),
        "config": args.config, "dtype": "float32", "hidden": H, "experts": args.experts,
        "expert_width": Fe, "top_k": k, "expert_bytes": expert_bytes, "repeats": args.repeats,
        "flush_mb": args.flush_mb, "loadavg_at_start": loadavg(),
    }
    log(f"# MoE expert kernel bench: {setting['cpu']}, {setting['cores']} cores, "
        f"jax {setting['jax']} ({setting['backend']})")
    log(f"# config {args.config}: H={H}, {args.experts} experts of width {Fe}, top-{k}, float32, "
        f"{expert_bytes / 1e6:.2f} MB per expert; median of {args.repeats}, "
        f"cache flush {args.flush_mb} MiB")

    flush = Flusher(args.flush_mb)
    roof = roofline(args.repeats, flush, args.seed)
    bw = roof["gb_per_s"] * 1e9
    log(f"roofline: {roof['shape']}: {roof['median_ms']:.2f} ms -> {roof['gb_per_s']:.1f} GB/s")

    p = make_moe(jax.random.PRNGKey(args.seed), H, args.experts, Fe, cfg.share_expert_dim)
    fns = {impl: expert_fn(cfg.replace(moe_impl=impl.split("_")[0])) for impl in args.impls}
    layouts = {impl: kernel_inputs(impl, p) for impl in args.impls}
    results = []
    ragged_spent = 0.0
    for batch in args.batches:
        y, w, idx = routed_inputs(cfg, p, batch, args.seed)
        distinct = int(np.unique(np.asarray(idx)).size)
        nbytes = distinct * expert_bytes
        ideal_s = nbytes / bw
        outs = {}
        for impl in args.impls:
            row = {"batch": batch, "impl": impl, "distinct_experts": distinct, "bytes": nbytes,
                   "ideal_ms": ideal_s * 1e3}
            fn, pi = fns[impl], layouts[impl]
            if impl == "ragged":
                # Project this batch's cost from one run before committing to the repeats.
                jax.block_until_ready(fn(y, w, idx, pi))  # compile
                t0 = time.perf_counter()
                jax.block_until_ready(fn(y, w, idx, pi))
                one = time.perf_counter() - t0
                projected = one * (args.repeats + 2)
                if ragged_spent + projected > args.ragged_budget:
                    log(f"batch {batch:>4} {impl:>6}: SKIPPED (one run {one * 1e3:.0f} ms; "
                        f"{ragged_spent:.1f} s spent + {projected:.1f} s projected > "
                        f"{args.ragged_budget:.0f} s budget)")
                    row.update(skipped=True, single_run_ms=one * 1e3)
                    results.append(row)
                    continue
            t = time_fn(fn, (y, w, idx, pi), args.repeats, flush)
            if impl == "ragged":
                ragged_spent += t["median_s"] * (args.repeats + 2)
            outs[impl] = np.asarray(fn(y, w, idx, pi))
            row.update(skipped=False, median_ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3,
                       max_ms=t["max_s"] * 1e3, compile_s=t["compile_s"],
                       fraction_of_roofline=ideal_s / t["median_s"],
                       effective_gb_per_s=nbytes / t["median_s"] / 1e9)
            results.append(row)
            log(f"batch {batch:>4} {impl:>6}: {row['median_ms']:8.2f} ms  "
                f"(ideal {row['ideal_ms']:6.2f} ms, {distinct:2d} experts, "
                f"{100 * row['fraction_of_roofline']:5.1f}% of roofline)")
        if len(outs) > 1:
            first, *others = outs.values()
            diff = max(float(np.max(np.abs(first - o))) for o in others)
            for row in results[-len(args.impls):]:
                row["max_abs_diff_between_impls"] = diff
            log(f"batch {batch:>4}: max difference between kernels = {diff:.2e}")

    doubling = None
    if not args.no_doubling:
        per_e = {}
        for n_exp in (args.experts, 2 * args.experts):
            c = cfg.replace(moe_num_experts=n_exp, moe_impl="loop")
            pe = p if n_exp == args.experts else make_moe(
                jax.random.PRNGKey(args.seed + 1), H, n_exp, Fe, cfg.share_expert_dim)
            y, w, idx = routed_inputs(c, pe, 1, args.seed)
            t = time_fn(expert_fn(c), (y, w, idx, kernel_inputs("loop", pe)), args.repeats, flush)
            per_e[n_exp] = t["median_s"] * 1e3
            log(f"doubling: loop, batch 1, {n_exp:3d} experts: {per_e[n_exp]:.2f} ms")
            del pe
        ratio = per_e[2 * args.experts] / per_e[args.experts]
        doubling = {"impl": "loop", "batch": 1, "top_k": k,
                    "experts": [args.experts, 2 * args.experts],
                    "median_ms": [per_e[args.experts], per_e[2 * args.experts]],
                    "ratio": ratio, "target_max_change": DOUBLING_TARGET,
                    "meets_target": abs(ratio - 1.0) < DOUBLING_TARGET}
        log(f"doubling ratio {2 * args.experts}/{args.experts} experts: {ratio:.3f} "
            f"({'meets' if doubling['meets_target'] else 'misses'} the <15% target)")

    # The roofline again at the end: if the machine's bandwidth moved during the run (other load),
    # the two disagree and the fractions above are suspect.
    roof_end = roofline(args.repeats, flush, args.seed)
    roof["end_median_ms"], roof["end_gb_per_s"] = roof_end["median_ms"], roof_end["gb_per_s"]
    drift = roof_end["gb_per_s"] / roof["gb_per_s"] - 1.0
    roof["drift"] = drift
    log(f"roofline at the end: {roof_end['gb_per_s']:.1f} GB/s ({100 * drift:+.0f}% vs start)"
        + ("  WARNING: bandwidth moved during the run; rerun on a quiet machine"
           if abs(drift) > 0.15 else ""))
    setting["loadavg_at_end"] = loadavg()

    report = {"setting": setting, "roofline": roof, "results": results, "doubling": doubling}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        log("")
        log("| batch | impl | distinct experts | measured ms | ideal ms | fraction of roofline |")
        log("|---|---|---|---|---|---|")
        for r in results:
            measured = "skipped" if r["skipped"] else f"{r['median_ms']:.2f}"
            frac = "—" if r["skipped"] else f"{100 * r['fraction_of_roofline']:.1f}%"
            log(f"| {r['batch']} | {r['impl']} | {r['distinct_experts']} | {measured} | "
                f"{r['ideal_ms']:.2f} | {frac} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
