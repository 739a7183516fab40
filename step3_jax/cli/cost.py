"""``step3-jax cost``: the paper's decoding-cost model for Step-3 and eight other models
(:mod:`step3_jax.analysis.costmodel`), plus a row per ``--config`` (a Step-3.5-family config
through :mod:`step3_jax.analysis.step35`)."""

from __future__ import annotations

import argparse

from step3_jax.cli import common
from step3_jax.cli.common import log


def add_parser(sub) -> argparse.ArgumentParser:
    cost = sub.add_parser(
        "cost", help="the paper's decoding-cost model: Step-3 and eight other models",
        description="Per decoded token at a context: KV bytes, attention-core, linear and FFN "
                    "FLOPs, arithmetic intensity, and USD per 1M tokens on H800, H20, A800 and "
                    "910B, with the AFD (cheapest attention + cheapest FFN) total and the "
                    "minimum MoE sparsity per accelerator. Step-3 is read from "
                    "configs/step3.json through the weight declaration; --config adds a row.")
    cost.add_argument("--context", type=int, default=8192, metavar="C",
                      help="context length in tokens (default 8192)")
    cost.add_argument("--config", action="append", default=[], metavar="PRESET|FILE",
                      help="add this model's row (repeatable): a preset (step35-flash, "
                           "step35-bench, bench, ...) or a config.json of either family; a "
                           "Step-3.5 row is also split by attention kind (full / sliding)")
    cost.add_argument("--plot", metavar="FILE.png",
                      help="also draw cost against activated parameters (needs matplotlib)")
    common.output_args(cost)
    return cost


def run(args) -> dict:
    from step3_jax.analysis import costmodel, step35
    from step3_jax.model.step35_reader import load_any_config

    costmodel.check_context(args.context)
    out = step35.cost_report(args.context, [load_any_config(c) for c in args.config])
    if args.plot:
        costmodel.plot_report(out, args.plot)
        log.info("wrote %s", args.plot)
    if not args.json:
        print(costmodel.format_report(out))
    return out
