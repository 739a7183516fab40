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
    sc.add_argument("--ids-file", metavar="FILE",
                    help="token ids to score from a file, separated by commas and/or whitespace "
                         "(- reads standard input)")
    sc.add_argument("--text-file", metavar="FILE",
                    help="text to score from a file (- reads standard input; needs "
                         "tokenizer.json beside the checkpoint)")
    common.prefill_args(sc)
    common.afd_args(sc)
    common.output_args(sc)
    return sc


def run(args) -> dict:
    from step3_jax.runtime.generate import check_prefill_chunk, check_prompts, score

    given = [x for x in (args.ids, args.text, args.ids_file, args.text_file) if x is not None]
    if len(given) != 1:
        raise Step3Error("give exactly one of --ids 1,2,3, --text TEXT, --ids-file FILE or "
                         "--text-file FILE")
    check_prefill_chunk(args.prefill_chunk)
    cfg = common.config(args)
    common.refuse_step3_only(args, cfg)
    if args.ids is not None or args.ids_file is not None:
        ids = args.ids or common.read_ids_file(args.ids_file, "--ids-file")
    else:
        flag = "--text" if args.text is not None else "--text-file"
        text = args.text if args.text is not None else common.read_text_file(args.text_file,
                                                                            flag)
        ids = common.tokenizer(args, flag).encode(text).ids
    if len(ids) < 2:
        raise Step3Error(f"scoring needs at least 2 tokens, got {len(ids)}")
    check_prompts([ids], cfg)
    plan = common.afd_plan(args)
    common.check_memory(args, cfg, plan, batch=1, longest=len(ids), new_tokens=0,
                        scoring=plan is None)
    params, cfg = common.load(args, plan)
    if plan is not None:
        from step3_jax.runtime import afd

        logprobs = afd.score(afd.place(params, cfg, plan), ids)
    else:
        logprobs = score(params, cfg, ids, prefill_chunk=args.prefill_chunk)
    mean = sum(logprobs) / len(logprobs)
    out = {"ids": ids, "logprobs": logprobs, "mean_logprob": mean, "perplexity": math.exp(-mean)}
    if not args.json:
        for token, lp in zip(ids[1:], logprobs):
            print(f"{token}\t{lp:.6f}")
        print(f"perplexity\t{out['perplexity']:.4f}")
    return out
