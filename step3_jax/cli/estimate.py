"""``step3-jax estimate``: the roofline of Step-3 on an AFD deployment beside the paper's
measured figures (:mod:`step3_jax.analysis.estimate`)."""

from __future__ import annotations

import argparse

from step3_jax.cli import common


def add_parser(sub) -> argparse.ArgumentParser:
    est = sub.add_parser(
        "estimate", help="roofline TPOT and tokens/GPU/s of Step-3 on an AFD deployment",
        description="A roofline model of the AFD pipeline (attention, transfer, FFN stages) "
                    "for Step-3, beside the paper's measured tokens/GPU/s. Defaults: the "
                    "paper's 2A2F setting (H800, batch 6144, context 4096).")
    est.add_argument("--hardware", default="H800", metavar="HW[:HW]",
                     help="H800, H20, A800 or 910B; ATTENTION:FFN for a mix (default H800)")
    est.add_argument("--afd", default="2:2", metavar="A:F",
                     help="attention and FFN servers of 8 accelerators, e.g. 2:2 or 2A2F "
                          "(default 2:2)")
    est.add_argument("--batch", type=int, default=6144, metavar="B",
                     help="concurrent sequences (default 6144)")
    est.add_argument("--context", type=int, default=4096, metavar="C",
                     help="context length of every sequence (default 4096)")
    est.add_argument("--micro-batches", type=int, default=3, metavar="N",
                     help="micro-batches in the A/transfer/F pipeline (default 3)")
    est.add_argument("--attention-dtype", default="fp8", metavar="fp8|bf16",
                     help="KV cache and attention GEMMs in FP8 (default) or BF16")
    est.add_argument("--config", default="step3", metavar="PRESET|FILE",
                     help="the Step-3 config to derive the model from (default step3)")
    common.output_args(est)
    return est


def run(args) -> dict:
    from step3_jax.analysis.estimate import estimate, format_estimate
    from step3_jax.model.config import load_config

    out = estimate(hardware=args.hardware, afd=args.afd, batch=args.batch, context=args.context,
                   micro_batches=args.micro_batches, attention_dtype=args.attention_dtype,
                   cfg=load_config(args.config))
    if not args.json:
        print(format_estimate(out))
    return out
