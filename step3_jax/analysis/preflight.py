"""Memory that cannot fit is refused before the work: the bytes a run needs, from the memory
plan's arithmetic (:mod:`step3_jax.analysis.plan`), against what the devices have.

A run holds its weights, the KV cache of every sequence at the cache's capacity, and the
activations of its largest phase: one decode step, or the prefill of ``piece`` tokens per
sequence over ``capacity`` key slots (chunked prefill: the chunk; otherwise the whole prompt
bucket), whichever is larger — with the attention kernel ``--attention-impl`` picks for those
shapes. On XLA:CPU every (emulated) device allocates from the same host memory, so the whole
placement's bytes are set against the host's available memory (``MemAvailable``); on an
accelerator each device's bytes against its own ``bytes_limit``.
"""

from __future__ import annotations

import os

import jax

from step3_jax.analysis.deployment import BYTES, Placement, shards, weight_bytes
from step3_jax.analysis.plan import activations, sequences_per_device
from step3_jax.errors import Step3Error
from step3_jax.model.config import Step3Config
from step3_jax.model.moe import resolve_impl

_FORMATS = {"float32": "float32", "bfloat16": "bf16", "float16": "bf16"}


def requirement(cfg: Step3Config, placement: Placement, *, batch: int, piece: int,
                capacity: int, weights_format: str | None = None, extra: int = 0) -> dict:
    """Bytes per device of each group (``colocated``, or AFD's ``attention`` and ``ffn``):
    ``weights``, ``kv_cache``, ``activations`` (the larger of a decode step and a prefill pass
    of ``piece`` tokens per sequence, plus ``extra`` on the attention side: scoring's
    per-chunk logits), ``total``, and ``devices`` in the group."""
    fmt = _FORMATS[cfg.dtype]
    wfmt = weights_format or fmt
    act = BYTES[fmt]
    kernel = "ragged" if resolve_impl(cfg) == "ragged" else "loop"
    kw = dict(act=act, kernel=kernel, weight_bytes_per_value=BYTES[wfmt if wfmt != "fp8" else
                                                                    "bf16"])
    decode = activations(cfg, placement, batch, capacity, **kw)
    prefill = activations(cfg, placement, batch, capacity, queries=piece, **kw)
    items = shards(cfg, placement)
    kv = sequences_per_device(placement, batch) * capacity * cfg.kv_elements_per_token * act
    out = {}
    for group in decode:
        acts = max(decode[group]["total"], prefill[group]["total"])
        acts += 0 if group == "ffn" else extra
        weights = weight_bytes([s for s in items if s.group == group], wfmt)["total"]
        held_kv = 0 if group == "ffn" else kv
        devices = (placement.attention if group == "attention" else
                   placement.ffn_ep * placement.ffn_tp if group == "ffn" else placement.devices)
        out[group] = {"devices": devices, "weights": weights, "kv_cache": held_kv,
                      "activations": acts, "total": weights + held_kv + acts}
    return out


def host_available() -> int | None:
    """Bytes the host can still give (``MemAvailable`` in ``/proc/meminfo``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def device_limit(device) -> int | None:
    """An accelerator's allocatable bytes (``memory_stats()["bytes_limit"]``), or None."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory stats raise various errors
        return None
    return stats.get("bytes_limit")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check(cfg: Step3Config, placement: Placement, *, batch: int, piece: int, capacity: int,
          what: str, weights_format: str | None = None, extra: int = 0, devices=None) -> dict:
    """Raise a one-line :class:`Step3Error` when the run cannot fit (``what`` names the
    request: "1 prompt of 300,000 tokens + 32 new"); returns the requirement otherwise."""
    need = requirement(cfg, placement, batch=batch, piece=piece, capacity=capacity,
                       weights_format=weights_format, extra=extra)
    device = (devices or jax.devices())[0]
    if device.platform == "cpu":
        total = sum(g["devices"] * g["total"] for g in need.values())
        have, where = host_available(), "this machine has"
        parts = {k: sum(g["devices"] * g[k] for g in need.values())
                 for k in ("weights", "kv_cache", "activations")}
    else:
        group = max(need.values(), key=lambda g: g["total"])
        total, have = group["total"], device_limit(device)
        where = f"each {device.device_kind} has"
        parts = {k: group[k] for k in ("weights", "kv_cache", "activations")}
    if have is not None and total > have:
        biggest = max(parts, key=parts.get).replace("_", " ")
        detail = ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in parts.items())
        raise Step3Error(f"{what} needs {_gb(total)} ({detail}; mostly {biggest}); {where} "
                         f"{_gb(have)} available")
    return need
