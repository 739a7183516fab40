"""``step3-jax export``: an orbax store back to Hub safetensors
(:mod:`step3_jax.checkpoint.convert`)."""

from __future__ import annotations

import argparse

from step3_jax.cli import common


def add_parser(sub) -> argparse.ArgumentParser:
    exp = sub.add_parser(
        "export", help="orbax checkpoint -> Hub safetensors (sharded, with index and config)",
        description="Write an orbax checkpoint made by `convert` back in the Hub format: one "
                    "safetensors shard per layer, model.safetensors.index.json, config.json "
                    "and tokenizer files, in the stored dtype (fp8 stores as block-FP8), one "
                    "weight at a time.")
    exp.add_argument("--checkpoint", required=True, metavar="DIR", help="orbax checkpoint")
    exp.add_argument("--out", required=True, metavar="DIR", help="output Hub directory")
    exp.add_argument("--force", action="store_true", help="replace a non-empty --out")
    common.output_args(exp)
    return exp


def run(args) -> dict:
    from step3_jax.checkpoint.convert import export

    out = export(args.checkpoint, args.out, force=args.force, progress=not args.quiet)
    if not args.json:
        print(f"{out['output']}: {out['tensors']} tensors in {out['shards']} safetensors shards "
              f"({out['bytes'] / 1e9:.3f} GB, {out['weights']})")
    return out
