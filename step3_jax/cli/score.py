"""``step3-jax score``: the log-probability of each token given its prefix."""

from __future__ import annotations

import argparse
import math

from step3_jax.cli import common
from step3_jax.errors import Step3Error


def add_parser(sub) -> argparse.ArgumentParser:
    sc = sub.add_parser(
        "score", help="log-probability of each token given its prefix",
        description="Score token ids: logprobs[i-1] = log p(ids[i] | ids[:i]) for i >= 1.")
    common.model_args(sc)
    sc.add_argument("--ids", type=common.ids, metavar="1,2,3,...", help="token ids to score")
    sc.add_argument("--text", help="text to score (needs tokenizer.json beside the checkpoint)")
    common.afd_args(sc)
    common.output_args(sc)
    return sc


def run(args) -> dict:
    from step3_jax.runtime.generate import check_prompts, score

    if (args.ids is None) == (args.text is None):
        raise Step3Error("give exactly one of --ids 1,2,3 or --text TEXT")
    cfg = common.config(args)
    ids = (args.ids if args.ids is not None
           else common.tokenizer(args, "--text").encode(args.text).ids)
    if len(ids) < 2:
        raise Step3Error(f"scoring needs at least 2 tokens, got {len(ids)}")
    check_prompts([ids], cfg)
    plan = common.afd_plan(args)
    params, cfg = common.load(args, plan)
    if plan is not None:
        from step3_jax.runtime import afd

        logprobs = afd.score(afd.place(params, cfg, plan), ids)
    else:
        logprobs = score(params, cfg, ids)
    mean = sum(logprobs) / len(logprobs)
    out = {"ids": ids, "logprobs": logprobs, "mean_logprob": mean, "perplexity": math.exp(-mean)}
    if not args.json:
        for token, lp in zip(ids[1:], logprobs):
            print(f"{token}\t{lp:.6f}")
        print(f"perplexity\t{out['perplexity']:.4f}")
    return out
