#!/usr/bin/env python
"""Train the demo model shipped inside the package (``step3_jax/demo_model/``).

A small model with Step-3's exact architecture (``configs/demo.json``: MFA with one shared K/V
head, 8 experts top-3 plus a shared expert, dense first and last layers) trained with optax
(AdamW, warm-up + cosine schedule, global-norm clipping) on the ``.py`` files of Python's own
standard library, read from this machine at start-up (``step3_jax/training/data.py``: the corpus, the
by-file validation split, the byte-level tokenizer). About 16 minutes on 2 quiet CPU cores with
the defaults (0.93 s per step); longer on a shared machine.

What it writes to ``--out`` (replaced as a whole, atomically, at the end):

* the orbax checkpoint (``step3_jax.checkpoint.store.save``: ``config.json``, manifest, arrays);
* ``tokenizer.json`` — the byte-level tokenizer, so ``--prompt TEXT`` needs nothing else;
* ``validation.txt`` — the held-out text the validation perplexity is measured on;
* ``training.json`` — the record: validation perplexity (measured on the checkpoint as saved and
  reloaded through ``step3_jax.load``), steps, seed, optimizer, corpus (files, bytes, SHA-256 of
  both token streams, Python version), JAX/optax versions, time, and the loss history.

and the loss curve to ``--plot`` (train loss per step, its moving average, validation loss).

Reproducibility: the corpus order, the split, the samples (a NumPy generator seeded with
``--seed``) and the initial weights (``--seed``) are deterministic, and XLA:CPU is deterministic
for a fixed program on a fixed machine, so retraining with the same flags on the same Python,
JAX and CPU reproduces the recorded figures (checked: a second run gave bit-identical weights).
Elsewhere the float32 summation order differs and training amplifies it: expect the figures
within a few percent, not bit for bit.

    python tools/train_demo.py                                  # ~16 min; the shipped model
    python tools/train_demo.py --steps 50 --out /tmp/demo --plot /tmp/loss.png   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("step3_jax")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the shipped demo model (Step-3 architecture, byte-level, on Python's "
                    "standard library) with optax, and write its checkpoint, tokenizer, "
                    "validation text, training record and loss curve.")
    p.add_argument("--config", default="demo", metavar="PRESET|FILE",
                   help="model config (default: the demo preset, configs/demo.json)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, default=256,
                   help="tokens per sequence after <|bos|> (default 256; at most the config's "
                        "max_position_embedding)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (1.0)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights and the sample order (default 0)")
    p.add_argument("--val-windows", type=int, default=128,
                   help="validation windows (up to --seq-len tokens from line starts spread "
                        "evenly over the held-out files) for the recorded perplexity (128)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps between validation-loss points of the curve (default 100)")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="how many of them (spread out) give those points (default 32)")
    p.add_argument("--mesh", metavar="dp=N,tp=N,ep=N",
                   help="train sharded over a device mesh (the inference rules table)")
    p.add_argument("--weights", choices=("float32", "bfloat16"), default="float32",
                   help="stored weight dtype (default float32)")
    p.add_argument("--out", type=Path, default=ROOT / "step3_jax" / "demo_model",
                   help="checkpoint directory (default step3_jax/demo_model, the shipped one)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="write the loss curve here (needs matplotlib)")
    p.add_argument("--stdlib", type=Path, default=None,
                   help="corpus root (default: this Python's standard library)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def plot_curve(history: dict, record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.asarray(history["step"])
    loss = np.asarray(history["train_loss"])
    window = max(1, min(50, len(loss) // 10))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.6,
            label=f"train ({window}-step mean)")
    ax.plot(history["val_step"], history["val_loss"], "o-", color="tab:orange", ms=3.5, lw=1.4,
            label=f"validation ({record['eval_windows']} of the {record['validation']['windows']}"
                  " windows)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_ylim(0, min(6.0, float(np.max(loss)) * 1.05))
    ax.grid(alpha=0.3)
    ax.set_title(f"step3-jax demo ({record['parameters'] / 1e6:.1f}M params, "
                 f"{record['tokens_seen'] / 1e6:.1f}M tokens): validation perplexity "
                 f"{record['validation_perplexity']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def cpu_model() -> str | None:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("train_demo: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    import jax
    import numpy as np
    import optax
    from tqdm.auto import tqdm

    import step3_jax
    from step3_jax.checkpoint import store
    from step3_jax.errors import Step3Error
    from step3_jax.model.config import load_config
    from step3_jax.model.sharding import parse_mesh
    from step3_jax.model.weights import count_params
    from step3_jax.training import data, demo, train

    try:
        cfg = train.training_config(load_config(args.config))
        if (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_ids) != (
                data.VOCAB_SIZE, data.BOS_ID, (data.EOS_ID,)):
            raise Step3Error(f"config {cfg.name!r}: vocab_size/bos/eos must match the byte "
                             f"tokenizer ({data.VOCAB_SIZE}, {data.BOS_ID}, {data.EOS_ID})")
        if args.seq_len > cfg.max_position_embedding:
            raise Step3Error(f"--seq-len {args.seq_len} exceeds the config's "
                             f"max_position_embedding ({cfg.max_position_embedding})")
        mesh = parse_mesh(args.mesh) if args.mesh else None
        for flag in ("steps", "batch", "seq_len", "val_windows", "eval_windows", "eval_every"):
            if getattr(args, flag) < 1:
                raise Step3Error(f"--{flag.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(args, flag)}")
        warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
        schedule = train.lr_schedule(steps=args.steps, peak_lr=args.lr, warmup_steps=warmup)
    except Step3Error as e:
        print(f"train_demo: error: {e}", file=sys.stderr)
        return 2

    # ----- corpus ---------------------------------------------------------------------------
    files = data.stdlib_files(args.stdlib)
    train_files, val_files = data.split(files)
    train_tokens = data.stream(train_files)
    val_tokens = data.stream(val_files)
    tokenizer = data.byte_tokenizer()
    val_windows = data.validation_windows(val_tokens, args.seq_len, args.val_windows)
    val_text = data.windows_text(val_windows)
    val_samples, val_lengths = data.text_samples(val_text, tokenizer, args.seq_len)
    if [list(s[1: 1 + n]) for s, n in zip(val_samples, val_lengths)] != [
            w.tolist() for w in val_windows]:
        raise AssertionError("the tokenizer does not read validation.txt back to its windows")
    every = max(1, args.val_windows // args.eval_windows)  # curve points: a spread-out subset
    eval_samples, eval_lengths = val_samples[::every], val_lengths[::every]
    log.info("corpus: %d train files (%.2f MB), %d held out; %s", len(train_files),
             len(train_tokens) / 1e6, len(val_files), data.stdlib_root()
             if args.stdlib is None else args.stdlib)

    # ----- training -------------------------------------------------------------------------
    optimizer = train.make_optimizer(cfg, steps=args.steps, peak_lr=args.lr,
                                     warmup_steps=warmup, weight_decay=args.weight_decay,
                                     clip_norm=args.clip)
    state = train.init_state(cfg, optimizer, seed=args.seed, mesh=mesh)
    step_fn = train.jit_train_step(cfg, optimizer, mesh)
    batches = data.train_batches(train_tokens, args.batch, args.seq_len, args.seed)
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}

    def evaluate(step):
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            nll = train.mean_nll(state.params, eval_samples, cfg, eval_lengths, args.batch)
        history["val_step"].append(step)
        history["val_loss"].append(round(nll, 5))
        return nll

    start = time.perf_counter()
    val = evaluate(0)
    bar = tqdm(range(1, args.steps + 1), desc="training", unit="step", disable=args.quiet,
               file=sys.stderr, dynamic_ncols=True)
    smooth = None
    for step in bar:
        state, metrics = step_fn(state, next(batches))
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {step}")
        history["step"].append(step)
        history["train_loss"].append(round(loss, 5))
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(step)
        bar.set_postfix(loss=f"{smooth:.3f}", val=f"{val:.3f}", lr=f"{float(schedule(step)):.1e}")
    bar.close()
    train_seconds = time.perf_counter() - start

    # ----- save, reload, measure, record -----------------------------------------------------
    out = args.out.expanduser().absolute()
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        store.save(state.params, cfg.replace(moe_impl="auto"), staging, weights=args.weights,
                   force=True, progress=not args.quiet)
        tokenizer.save(str(staging / "tokenizer.json"))
        (staging / demo.VALIDATION).write_text(val_text, encoding="utf-8")
        params, loaded_cfg = step3_jax.load(staging, progress=False)
        nll, ppl = demo.validation_perplexity(params, loaded_cfg, staging, args.seq_len,
                                              batch=args.batch)
        counts = count_params(cfg)
        record = {
            "validation_perplexity": round(ppl, 4),
            "validation_nll": round(nll, 5),
            "validation": {
                "text": demo.VALIDATION, "windows": args.val_windows, "seq_len": args.seq_len,
                "tokens": int(val_lengths.sum()),
                "definition": "exp(mean NLL per token) over the <|bos|>-separated samples of "
                              "validation.txt read through tokenizer.json: WINDOWS windows of "
                              "up to SEQ_LEN tokens from line starts spread evenly over the "
                              "held-out files, each scored after its <|bos|>",
                "sha256": data.stream_digest(val_samples)},
            "final_train_loss_mean50": round(float(np.mean(history["train_loss"][-50:])), 5),
            "config": cfg.name, "parameters": counts["total"],
            "activated_parameters": counts["activated"], "stored_weights": args.weights,
            "checkpoint_bytes": store.stored_bytes(staging),
            "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
            "tokens_seen": args.steps * args.batch * args.seq_len, "seed": args.seed,
            "optimizer": {"name": "adamw", "peak_lr": args.lr, "warmup_steps": warmup,
                          "schedule": "linear warm-up, cosine decay to 0.1 x peak",
                          "b1": 0.9, "b2": 0.95, "weight_decay": args.weight_decay,
                          "weight_decay_on": "weights of rank >= 2",
                          "clip_global_norm": args.clip},
            "moe_impl": cfg.moe_impl, "mesh": dict(mesh.shape) if mesh is not None else None,
            "eval_windows": len(eval_samples),
            "corpus": {
                "source": f"Python {platform.python_version()} standard library, .py files "
                          f"({'sysconfig stdlib' if args.stdlib is None else str(args.stdlib)})",
                "excluded_dirs": sorted(data.EXCLUDED_DIRS),
                "excluded_prefixes": list(data.EXCLUDED_PREFIXES),
                "split": f"by file: SHA-256 of the salted relative path, "
                         f"{data.VAL_PERCENT}% held out",
                "train_files": len(train_files), "validation_files": len(val_files),
                "train_tokens": int(len(train_tokens)),
                "validation_tokens": int(len(val_tokens)),
                "train_sha256": data.stream_digest(train_tokens)},
            "tokenizer": "byte-level: ids 0-255 bytes, 256 <|bos|>, 257 <|eos|>",
            "python": platform.python_version(), "jax": jax.__version__,
            "optax": optax.__version__, "machine": platform.machine(),
            "processor": cpu_model(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "train_seconds": round(train_seconds, 1),
            "history": history,
        }
        (staging / demo.RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, trash)
            os.rename(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("validation perplexity %.4f (%.4f nats/byte) over %d x %d tokens; %s (%.1f MB); "
             "trained %d steps in %.0f s", ppl, nll, args.val_windows, args.seq_len, out,
             record["checkpoint_bytes"] / 1e6, args.steps, train_seconds)
    if args.plot:
        plot_curve(history, record, args.plot)
        log.info("wrote %s", args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
