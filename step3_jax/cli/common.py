"""What the model-running subcommands share: the model, AFD and output flags, and the config,
weights and tokenizer those flags name (checked before any weight loads)."""

from __future__ import annotations

import argparse
import logging

from step3_jax.errors import Step3Error

log = logging.getLogger("step3_jax")

DEFAULT_PRESET = "tiny"


def ids(text: str) -> list[int]:
    """``--prompt-ids``/``--ids``: comma-separated token ids (an argparse type)."""
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}")
    if not out:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return out


DEMO_MODEL = "the demo model shipped in the package (step3_jax/demo_model, byte-level tokenizer)"


def model_args(p: argparse.ArgumentParser, neither: str = DEMO_MODEL) -> None:
    """The model flags; ``neither``: what runs without --checkpoint and --config."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="a Hub checkpoint directory (config.json + safetensors) or an orbax "
                        "store written by `step3-jax convert`. Without it, --config with seeded "
                        f"random weights; with neither, {neither}")
    g.add_argument("--config", metavar="PRESET|FILE",
                   help="preset name (tiny, bench, step3, demo) or config.json path, with "
                        "seeded random weights")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight and activation dtype (default float32: XLA:CPU runs bfloat16 "
                        "matmuls ~25x slower)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for random weights and for sampling (default 0)")
    g.add_argument("--moe-impl", choices=("auto", "loop", "ragged"), default="auto",
                   help="MoE expert kernel: loop (XLA:CPU), ragged (ragged_dot, GPU/TPU); "
                        "default auto picks by backend")
    g.add_argument("--mesh", metavar="dp=N,tp=N,ep=N",
                   help="shard over a device mesh: dp splits the batch (and the KV cache), tp "
                        "the heads and FFN widths, ep the experts; omitted axes are 1 "
                        "(default: one device). Emulate devices on CPU with XLA_FLAGS="
                        "--xla_force_host_platform_device_count=8")


def afd_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("attention-FFN disaggregation")
    a.add_argument("--afd", metavar="A:F",
                   help="attention (+KV cache, router, LM head) on A devices, FFN/experts on "
                        "the next F devices; exclusive with --mesh")
    a.add_argument("--ffn-mesh", metavar="ep=N,tp=N",
                   help="how the FFN group splits the experts (default ep=F)")
    a.add_argument("--micro-batches", type=int, default=3,
                   help="micro-batches pipelined between the groups (default 3)")
    a.add_argument("--afd-transfer-dtype", default="float8_e4m3fn",
                   choices=("float8_e4m3fn", "bfloat16", "float32"),
                   help="A->F activations: FP8 e4m3 with per-token scales (default, as in the "
                        "paper) or a plain dtype; F->A results use the compute dtype")


def output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON document on stdout (logs go to stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")


def config(args):
    """The config alone (cheap): flags and ids are checked against it before weights load."""
    from step3_jax.checkpoint.loader import checkpoint_dir
    from step3_jax.model.config import load_config

    if args.checkpoint is None and args.config is None:
        default_model(args)
    source = args.config if args.config is not None else checkpoint_dir(args.checkpoint)
    return load_config(source, dtype=args.dtype, moe_impl=args.moe_impl)


def default_model(args) -> None:
    """Neither --checkpoint nor --config: the shipped demo model (or, in a checkout where it has
    not been trained, the ``tiny`` preset with random weights)."""
    from step3_jax.training import demo

    if not demo.available():
        args.config = DEFAULT_PRESET
        return
    args.checkpoint = str(demo.directory())
    rec = demo.record()
    log.info("no --checkpoint: the shipped demo model (%.1fM-parameter Step-3, byte-level, "
             "trained on Python's standard library; validation perplexity %.3f), %s",
             rec["parameters"] / 1e6, rec["validation_perplexity"], args.checkpoint)


def afd_plan(args):
    """The AFD plan of ``--afd`` (validated before any weight loads), or None."""
    if not args.afd:
        return None
    if args.mesh:
        raise Step3Error("--afd and --mesh are exclusive (use --ffn-mesh for the FFN group)")
    from step3_jax.runtime import afd

    return afd.parse_plan(args.afd, args.ffn_mesh, args.micro_batches, args.afd_transfer_dtype)


def load(args, plan=None):
    """The weights, each read straight onto its device(s): by ``--mesh``, or by the AFD groups."""
    from step3_jax.checkpoint.loader import load

    if args.checkpoint is None:
        log.info("no --checkpoint: config %r with seeded random weights (seed %d)", args.config,
                 args.seed)
    from step3_jax.model.sharding import parse_mesh

    placement = {}
    if plan is not None:
        from step3_jax.runtime import afd

        placement = {"shardings": afd.afd_shardings(config(args), plan),
                     "expert_parallel": plan.ffn_ep}
    elif args.mesh:
        placement = {"mesh": parse_mesh(args.mesh)}
    return load(args.checkpoint, args.config, dtype=args.dtype, seed=args.seed,
                moe_impl=args.moe_impl, progress=not args.quiet, **placement)


def tokenizer(args, what: str):
    from step3_jax.checkpoint.loader import load_tokenizer

    tok = load_tokenizer(args.checkpoint)
    if tok is None:
        where = args.checkpoint or f"the random-weight config {args.config!r}"
        raise Step3Error(f"{what} needs a tokenizer.json beside the checkpoint; {where} has "
                         "none (pass token ids instead)")
    return tok
