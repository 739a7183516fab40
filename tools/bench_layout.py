#!/usr/bin/env python
"""Weight layout on XLA:CPU: the same matmul with the weight stored ``[in, out]`` or ``[out, in]``.

For each weight shape of a config (the ``bench`` preset's: routed expert, shared expert, dense
FFN, attention projections, LM head) and each row count (decode batches 1-64; prefill 2048),
times three jitted forms of ``y = x W`` over the same float32 values:

* ``in_out``: ``x @ w`` with ``w [in, out]`` (the layout step3-jax used before this benchmark);
* ``out_in``: ``step3_jax.model.layers.linear(x, w)`` with ``w [out, in]`` (the Hub layout, what the
  model uses now): below ``layers.SMALL_ROWS`` rows ``(w @ xᵀ)ᵀ`` with an optimization barrier
  before the transpose, else a plain ``tensordot``;
* ``out_in_folded``: ``x @ w.T`` with ``w [out, in]`` and no barrier (XLA folds the transpose
  into the dot's output layout), to show what the barrier buys.

The last shape is the roofline's own ``8192 x 8192`` matvec: if ``out_in`` read it faster than
``in_out`` (the form ``bench.roofline`` times), every MBU figure would be against too low a peak.

Each timed call sums ``x W_i`` over enough distinct weights (``--megabytes`` in all, default 256)
that the weights come from DRAM, as in a decode step. Reports the GB/s of weight read and the
speed-up of ``out_in`` over ``in_out``; the roofline (``bench.roofline``) is measured in the same
run.

    python tools/bench_layout.py                 # table on stderr
    python tools/bench_layout.py --json          # one JSON document on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from step3_jax.model.config import load_config
from step3_jax.model.layers import linear
from step3_jax.runtime.bench import ROOFLINE_N, Flusher, cpu_model, csv_ints, roofline, time_fn

FORMS = ("in_out", "out_in", "out_in_folded")


def shapes(cfg) -> dict[str, tuple[int, int]]:
    """``name -> (out, in)`` of the config's distinct matmul weight shapes."""
    H, Q = cfg.hidden_size, cfg.share_q_dim
    nd = cfg.num_attention_heads * cfg.head_dim
    return {"routed expert gate/up": (cfg.moe_intermediate_size, H),
            "routed expert down": (H, cfg.moe_intermediate_size),
            "dense FFN gate/up": (cfg.intermediate_size, H),
            "dense FFN down": (H, cfg.intermediate_size),
            "q_proj": (Q, H), "wq": (nd, Q), "o_proj": (H, nd),
            "LM head": (cfg.padded_vocab, H),
            "roofline matvec": (ROOFLINE_N, ROOFLINE_N)}


def measure(out_dim: int, in_dim: int, rows: int, megabytes: int, repeats: int,
            flush: Flusher) -> dict:
    count = max(1, megabytes * (1 << 20) // (out_dim * in_dim * 4))
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((out_dim, in_dim), dtype=np.float32) for _ in range(count)]
    out_in = [jnp.asarray(w) for w in host]
    in_out = [jnp.asarray(np.ascontiguousarray(w.T)) for w in host]
    del host
    x = jnp.asarray(rng.standard_normal((rows, in_dim), dtype=np.float32))
    fns = {"in_out": (lambda x, ws: sum(x @ w for w in ws), in_out),
           "out_in": (lambda x, ws: sum(linear(x, w) for w in ws), out_in),
           "out_in_folded": (lambda x, ws: sum(x @ w.T for w in ws), out_in)}
    result, outputs = {}, {}
    for form in FORMS:
        fn, ws = fns[form]
        jitted = jax.jit(fn)
        outputs[form] = np.asarray(jitted(x, ws))
        t = time_fn(jitted, (x, ws), repeats, flush)["median_s"]
        result[form] = {"ms_per_matmul": 1e3 * t / count,
                        "gbs": count * out_dim * in_dim * 4 / t / 1e9}
    scale = np.abs(outputs["in_out"]).max()
    for form in FORMS[1:]:  # the forms compute the same product
        np.testing.assert_allclose(outputs[form], outputs["in_out"], atol=1e-4 * scale)
    result["speedup"] = result["in_out"]["ms_per_matmul"] / result["out_in"]["ms_per_matmul"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", help="preset or config.json (default bench)")
    parser.add_argument("--rows", type=csv_ints, default=[1, 4, 16, 64, 2048],
                        help="comma-separated row counts (default 1,4,16,64,2048)")
    parser.add_argument("--megabytes", type=int, default=256,
                        help="weight bytes summed per timed call (default 256)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls (median; default 7)")
    parser.add_argument("--flush-mb", type=int, default=1024,
                        help="cache flush before each timed call (default 1024; 0: none)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    flush = Flusher(args.flush_mb)
    peak = roofline(repeats=args.repeats, flush=flush)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"# weight layout: {cpu_model()}, {jax.device_count()} device(s), jax {jax.__version__}; "
        f"config {args.config}; roofline {peak['gb_per_s']:.1f} GB/s")
    rows_out = []
    for name, (o, i) in shapes(cfg).items():
        for rows in args.rows:
            r = measure(o, i, rows, args.megabytes, args.repeats, flush)
            rows_out.append({"weight": name, "out": o, "in": i, "rows": rows, **r})
            log(f"{name:22s} [{o}x{i}] rows {rows:5d}: in_out {r['in_out']['gbs']:5.1f} GB/s, "
                f"out_in {r['out_in']['gbs']:5.1f} GB/s, folded {r['out_in_folded']['gbs']:5.1f}"
                f" GB/s; out_in is {r['speedup']:.2f}x in_out")
    doc = {"cpu": cpu_model(), "jax": jax.__version__, "config": args.config,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "roofline_gbs": peak["gb_per_s"], "megabytes_per_call": args.megabytes, "results": rows_out}
    if args.json:
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
