"""The demo model shipped inside the package, and how its recorded figures are measured.

``step3_jax/demo_model/`` is written by ``tools/train_demo.py``: an orbax checkpoint
(``store.save``: ``config.json``, manifest, arrays), the byte-level ``tokenizer.json``
(``data.byte_tokenizer``), ``validation.txt`` (the held-out text the validation perplexity is
measured on) and ``training.json`` (the record: validation perplexity, steps, seed, corpus, JAX
version, loss history). The CLI's ``generate`` and ``score`` use it when given neither
``--checkpoint`` nor ``--config``.
"""

from __future__ import annotations

import json
from pathlib import Path

from step3_jax.errors import CheckpointError

RECORD = "training.json"
VALIDATION = "validation.txt"


def directory() -> Path:
    """Where the shipped demo checkpoint lives (inside the installed package)."""
    return Path(__file__).resolve().parent.parent / "demo_model"


def available(path: str | Path | None = None) -> bool:
    """Whether a complete demo checkpoint (its record written last) is at ``path``."""
    return (Path(path) if path is not None else directory()).joinpath(RECORD).is_file()


def record(path: str | Path | None = None) -> dict:
    """The training record beside the demo checkpoint."""
    file = Path(path if path is not None else directory()) / RECORD
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable training record ({e})") from None


def validation_samples(path: str | Path, seq_len: int):
    """``(samples [n, 1 + seq_len], lengths [n])``: ``validation.txt`` read back through the
    checkpoint's own ``tokenizer.json`` (so the shipped tokenizer is part of what is measured)
    and split at its ``<|bos|>`` markers (``data.text_samples``)."""
    from step3_jax.checkpoint.loader import load_tokenizer
    from step3_jax.training import data

    path = Path(path)
    tok = load_tokenizer(path)
    if tok is None:
        raise CheckpointError(f"{path}: no tokenizer.json")
    return data.text_samples((path / VALIDATION).read_text(encoding="utf-8"), tok, seq_len)


def validation_perplexity(params, cfg, path: str | Path, seq_len: int,
                          batch: int = 16) -> tuple[float, float]:
    """``(mean NLL in nats per token, perplexity)`` of ``params`` on the validation samples."""
    import math

    from step3_jax.training import train

    samples, lengths = validation_samples(path, seq_len)
    nll = train.mean_nll(params, samples, cfg, lengths, batch)
    return nll, math.exp(nll)
