"""``step3-jax convert``: a Hub checkpoint to an orbax store, streaming
(:mod:`step3_jax.checkpoint.convert`)."""

from __future__ import annotations

import argparse

from step3_jax.cli import common


def add_parser(sub) -> argparse.ArgumentParser:
    conv = sub.add_parser(
        "convert", help="Hub safetensors (bf16 or block-FP8) -> orbax checkpoint, streaming",
        description="Convert a Hub checkpoint directory (Step-3 or Step-3.5, by its "
                    "config.json) into an orbax checkpoint (one per layer), one tensor at a time (host memory a few of the largest tensor, "
                    "whatever the layer size). Headers are validated before anything is "
                    "written; the output appears only when complete, with the modes the umask "
                    "gives. generate/score/bench --checkpoint accept the result and restore "
                    "each weight straight onto its sharding.")
    conv.add_argument("--hf", required=True, metavar="DIR",
                      help="Hub checkpoint directory (config.json + safetensors)")
    conv.add_argument("--out", required=True, metavar="DIR", help="output directory")
    conv.add_argument("--dtype", choices=("bfloat16", "float32", "fp8"), default="bfloat16",
                      help="stored weights: bfloat16 (default) or float32 (FP8 sources "
                           "dequantized), or fp8, Step-3 only (block-FP8 values + scales, kept "
                           "from an FP8 source or quantized; router, embedding, LM head, norms "
                           "stay bf16)")
    conv.add_argument("--force", action="store_true",
                      help="replace a non-empty --out (only once the new one is complete)")
    common.output_args(conv)
    return conv


def run(args) -> dict:
    from step3_jax.checkpoint.convert import convert

    out = convert(args.hf, args.out, weights=args.dtype, force=args.force,
                  progress=not args.quiet)
    if not args.json:
        print(f"{out['output']}: {out['weights']} weights, {out['array_bytes_written'] / 1e9:.3f} "
              f"GB of arrays ({out['bytes_on_disk'] / 1e9:.3f} GB on disk) in "
              f"{out['seconds']:.1f} s")
    return out
