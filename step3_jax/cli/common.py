"""What the model-running subcommands share: the model, AFD and output flags, and the config,
weights and tokenizer those flags name (checked before any weight loads)."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from step3_jax.errors import Step3Error
from step3_jax.model.config import (DEFAULT_DECODE_STEPS, DEFAULT_MAX_NUM_SEQS,
                                    DEFAULT_PAGE_SIZE, DEFAULT_PREFILL_CHUNK)

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


def read_text_file(path: str, flag: str) -> str:
    """The text of ``path`` (``-``: standard input) for ``flag``, or a one-line error."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise Step3Error(f"{flag} {path}: cannot read ({getattr(e, 'strerror', None) or e})")
    if not text:
        raise Step3Error(f"{flag} {path}: the file is empty")
    return text


def read_ids_file(path: str, flag: str) -> list[int]:
    """Token ids from ``path`` (``-``: standard input), separated by commas and/or whitespace
    (a 65,536-token prompt is past the kernel's 128 KiB limit on one argument), or a one-line
    error naming the first bad entry."""
    fields = [f for f in re.split(r"[\s,]+", read_text_file(path, flag)) if f]
    bad = next((f for f in fields if not re.fullmatch(r"-?\d+", f)), None)
    if bad is not None:
        raise Step3Error(f"{flag} {path}: {bad[:20]!r} is not a token id")
    if not fields:
        raise Step3Error(f"{flag} {path}: no token ids")
    return [int(f) for f in fields]


def check_stdin_once(*paths: list[str]) -> None:
    """Standard input can be read once: ``-`` may appear in at most one file flag."""
    if sum(p.count("-") for p in paths) > 1:
        raise Step3Error("'-' (standard input) can be given to only one file flag, once")


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
                        "seeded random weights; beside --checkpoint it must match the "
                        "checkpoint's config.json")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight and activation dtype (default float32: XLA:CPU runs bfloat16 "
                        "matmuls ~25x slower)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for random weights and for sampling (default 0)")
    g.add_argument("--moe-impl", choices=("auto", "loop", "ragged"), default="auto",
                   help="MoE expert kernel: loop (XLA:CPU), ragged (ragged_dot, GPU/TPU); "
                        "default auto picks by backend")
    g.add_argument("--attention-impl", choices=("auto", "plain", "blocked"), default="auto",
                   help="attention kernel: plain (every score at once), blocked (online "
                        "softmax over key blocks, memory of one score tile, invisible blocks "
                        "skipped); default auto: plain while the batch's score array is at "
                        "most 64 MiB")
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


def prefill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="prefill a longer prompt N tokens at a time against the growing KV "
                        "cache, so activation memory follows N, not the prompt (0: the whole "
                        f"prompt at once; default {DEFAULT_PREFILL_CHUNK})")


ENGINE_FLAGS = ("max_num_seqs", "page_size", "num_pages", "decode_steps")


def engine_args(p: argparse.ArgumentParser, what: str | None):
    """The continuous-batching engine's flags; any of them runs ``what`` through the engine
    (None: the subcommand always runs it)."""
    how = ("at most --max-num-seqs sequences at once, the next request taking a finished one's "
           "slot, a paged KV cache, chunked prefill (--prefill-chunk tokens per step) between "
           "decode bursts")
    e = p.add_argument_group(
        "continuous batching",
        f"any of these flags runs {what} through the continuous-batching engine: {how}"
        if what else f"the continuous-batching engine: {how}")
    e.add_argument("--max-num-seqs", type=int, metavar="N",
                   help=f"sequences in flight (default {DEFAULT_MAX_NUM_SEQS})")
    e.add_argument("--page-size", type=int, metavar="N",
                   help=f"KV-cache page size in tokens (default {DEFAULT_PAGE_SIZE})")
    e.add_argument("--num-pages", type=int, metavar="N",
                   help="KV-cache pages (per attention device under --afd); default: enough "
                        "for --max-num-seqs full contexts or what fits in the free memory "
                        "after the weights and working set, whichever is smaller; when pages "
                        "run out the newest sequence is preempted and recomputed later")
    e.add_argument("--decode-steps", type=int, metavar="N",
                   help=f"decode steps per on-device loop, one host round trip each "
                        f"(default {DEFAULT_DECODE_STEPS})")
    return e


def uses_engine(args) -> bool:
    return any(getattr(args, f, None) is not None for f in ENGINE_FLAGS)


def engine(args, params, cfg, afd_model=None, max_model_len: int | None = None):
    """The engine the flags describe (defaults for the ones not given)."""
    from step3_jax.runtime.engine_setup import make_engine

    return make_engine(params, cfg, afd=afd_model,
                       max_num_seqs=args.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
                       page_size=args.page_size or DEFAULT_PAGE_SIZE,
                       num_pages=args.num_pages, prefill_chunk=args.prefill_chunk,
                       decode_steps=args.decode_steps or DEFAULT_DECODE_STEPS,
                       max_model_len=max_model_len)


def model_name(args, cfg) -> str:
    """The name a server gives the model: the checkpoint directory's, else the config's."""
    from pathlib import Path

    if args.checkpoint:
        return Path(args.checkpoint).resolve().name
    return cfg.name


def check_engine_flags(args) -> None:
    """Bad engine flags fail before any weight loads."""
    from step3_jax.runtime.engine_pages import check_engine_args

    if uses_engine(args) or getattr(args, "command", None) == "serve":
        given = lambda f, d: d if getattr(args, f) is None else getattr(args, f)  # noqa: E731
        check_engine_args(given("max_num_seqs", 1), given("page_size", 1),
                          given("num_pages", 1), args.prefill_chunk, given("decode_steps", 1))


def output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON document on stdout (logs go to stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")


def config(args):
    """The config alone (cheap): flags and ids are checked against it before weights load."""
    from step3_jax.checkpoint.loader import model_config

    if args.checkpoint is None and args.config is None:
        default_model(args)
    return model_config(args.checkpoint, args.config, dtype=args.dtype, moe_impl=args.moe_impl,
                        attention_impl=args.attention_impl)


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


ENGINE_STEP3_ONLY = "the continuous-batching engine serves Step-3 only; use generate/score"


def refuse_engine(cfg) -> None:
    """A Step-3.5 config cannot run through the continuous-batching engine (its paged cache
    holds Step-3's single K/V head): one line, before any weight loads."""
    from step3_jax.model import family

    if family.is_step35(cfg):
        raise Step3Error(f"config {cfg.name!r} is a Step-3.5 model: {ENGINE_STEP3_ONLY}")


def refuse_step3_only(args, cfg) -> None:
    """What runs Step-3 only, refused for a Step-3.5 config before any weight loads: AFD across
    processes (``--coordinator`` or ``$JAX_COORDINATOR_ADDRESS``; single-process ``--afd`` runs
    either family) and the engine's flags."""
    import os

    from step3_jax.model import family
    from step3_jax.runtime.launch import ENV_COORDINATOR

    if not family.is_step35(cfg):
        return
    if getattr(args, "afd", None) and (getattr(args, "coordinator", None)
                                       or os.environ.get(ENV_COORDINATOR)):
        raise Step3Error(f"config {cfg.name!r} is a Step-3.5 model: multi-process --afd "
                         "(--coordinator/$" + ENV_COORDINATOR + ") runs Step-3 only; run --afd "
                         "in one process")
    if uses_engine(args):
        raise Step3Error(f"config {cfg.name!r} is a Step-3.5 model: the continuous-batching "
                         "engine serves Step-3 only; drop --max-num-seqs, --page-size, "
                         "--num-pages and --decode-steps (a static batch runs it)")


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
                moe_impl=args.moe_impl, attention_impl=args.attention_impl,
                progress=not args.quiet, **placement)


def check_memory(args, cfg, plan, *, batch: int, longest: int, new_tokens: int,
                 scoring: bool = False) -> None:
    """Refuse, in one line and before any weight loads, a run whose weights, KV cache and
    activations cannot fit the devices (``analysis.preflight``)."""
    from step3_jax.analysis import deployment, preflight
    from step3_jax.checkpoint import store
    from step3_jax.runtime.generate import MIN_PREFILL_BUCKET, bucket, prefill_pieces, shape_buckets

    if scoring:
        capacity, piece = prefill_pieces(bucket(longest, MIN_PREFILL_BUCKET), args.prefill_chunk)
        piece = piece or capacity
        extra = 3 * piece * cfg.padded_vocab * 4  # a chunk's logits and log-probabilities
        what = f"scoring {longest:,} tokens"
    else:
        padded, capacity = shape_buckets(longest, new_tokens, cfg)
        piece = padded if plan is not None else (prefill_pieces(padded, args.prefill_chunk)[1]
                                                 or padded)
        extra = 0
        what = (f"{batch} prompt{'s' if batch > 1 else ''} of up to {longest:,} tokens "
                f"+ {new_tokens:,} new")
    from step3_jax.model import family

    if family.is_step35(cfg):
        return _check_step35_memory(args, cfg, plan, batch=batch, capacity=capacity,
                                    what=what)
    if plan is not None:
        placement = deployment.Placement(afd=True, attention=plan.attention, ffn_ep=plan.ffn_ep,
                                         ffn_tp=plan.ffn_tp, micro_batches=plan.micro_batches)
    else:
        placement = deployment.parse_placement(mesh=args.mesh)
    stored = (store.read_manifest(args.checkpoint)["weights"]
              if args.checkpoint is not None and store.is_store(args.checkpoint) else None)
    preflight.check(cfg, placement, batch=batch, piece=min(piece, capacity), capacity=capacity,
                    what=what, weights_format="fp8" if stored == "fp8" else None, extra=extra)


def _check_step35_memory(args, cfg, plan, *, batch: int, capacity: int, what: str) -> None:
    """:func:`check_memory` for a Step-3.5 config: its weights and its KV cache at
    ``capacity`` (full layers the whole capacity, sliding ones their window), spread evenly over
    the mesh's devices or AFD's two groups (``plan``), against the host (XLA:CPU) or each
    device. Activations are not counted and the spread is the most even one, so this refuses
    only what surely cannot fit."""
    import jax

    from step3_jax.analysis import deployment, preflight, step35

    item = 2 if cfg.dtype == "bfloat16" else 4
    weights = step35.param_counts(cfg)["total"] * item
    kv = batch * cfg.kv_elements(capacity) * item
    device = jax.devices()[0]
    if device.platform == "cpu":
        per_device, have, where = 1, preflight.host_available(), "this machine has"
    else:
        per_device = (plan.attention + plan.ffn if plan is not None
                      else deployment.parse_placement(mesh=args.mesh).devices)
        have, where = preflight.device_limit(device), f"each {device.device_kind} has"
    need = (weights + kv) // per_device
    if have is not None and need > have:
        raise Step3Error(f"{what} needs {need / 1e9:.1f} GB (weights {weights / 1e9:.1f} GB, kv "
                         f"cache {kv / 1e9:.1f} GB; activations not counted); {where} "
                         f"{have / 1e9:.1f} GB available")


def tokenizer(args, what: str):
    from step3_jax.checkpoint.loader import load_tokenizer

    tok = load_tokenizer(args.checkpoint)
    if tok is None:
        where = args.checkpoint or f"the random-weight config {args.config!r}"
        raise Step3Error(f"{what} needs a tokenizer.json beside the checkpoint; {where} has "
                         "none (pass token ids instead)")
    return tok
