"""The engine's page bookkeeping on the host: the free list, the pool's default size, and the
shape buckets its programs compile for."""

from __future__ import annotations

import math

from step3_jax.errors import Step3Error
from step3_jax.model.config import Step3Config
from step3_jax.model.paged import page_bytes

# The share of the free memory the default pool takes (the rest absorbs allocator slack and
# the host's own use).
POOL_MEMORY_FRACTION = 0.9


class PagePool:
    """Page ids ``0..size-1``; ``take`` the lowest free ones, ``release`` them back."""

    def __init__(self, size: int):
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # a stack: pop() gives the lowest id

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"{n} pages asked, {len(self._free)} free")
        taken = [self._free.pop() for _ in range(n)]
        return taken

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def bucket_pow2(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The power of two ``>= max(n, minimum)`` (at most ``maximum``, when that is larger than
    ``n``): the page-table widths and stop-id widths the engine's programs compile for."""
    p = 1 << (max(n, minimum) - 1).bit_length()
    return p if maximum is None else max(min(p, maximum), n)


def free_bytes(device) -> int | None:
    """Bytes a new allocation can take: the host's available memory on CPU, the accelerator's
    limit minus what is in use elsewhere; None when unknown."""
    from step3_jax.analysis import preflight

    if device.platform == "cpu":
        return preflight.host_available()
    limit = preflight.device_limit(device)
    return None if limit is None else limit - (device.memory_stats() or {}).get("bytes_in_use", 0)


def working_set_bytes(cfg: Step3Config, max_num_seqs: int, piece: int, capacity: int) -> int:
    """Activations of the engine's largest program (a decode burst over every slot, or a prefill
    chunk of ``piece`` tokens), from the memory plan's arithmetic."""
    from step3_jax.analysis import deployment, plan
    from step3_jax.model.moe import resolve_impl

    placement = deployment.Placement()
    act = 4 if cfg.dtype == "float32" else 2
    kw = dict(act=act, kernel="ragged" if resolve_impl(cfg) == "ragged" else "loop",
              weight_bytes_per_value=act)
    decode = plan.activations(cfg, placement, max_num_seqs, capacity, **kw)["colocated"]
    prefill = plan.activations(cfg, placement, 1, capacity, queries=piece, **kw)["colocated"]
    return max(decode["total"], prefill["total"])


def default_num_pages(cfg: Step3Config, *, page_size: int, max_num_seqs: int,
                      max_model_len: int, piece: int, itemsize: int, device) -> int:
    """What the pool defaults to: enough for ``max_num_seqs`` sequences at ``max_model_len``
    (more could never be used), or what fits in the device's free memory (the weights are
    already placed) minus the largest program's working set, whichever is smaller."""
    want = max_num_seqs * math.ceil(max_model_len / page_size)
    free = free_bytes(device)
    if free is None:
        return want
    spare = free - working_set_bytes(cfg, max_num_seqs, piece, max_model_len)
    fit = int(POOL_MEMORY_FRACTION * spare) // page_bytes(cfg, page_size, itemsize)
    if fit < 1:
        raise Step3Error(f"no memory left for the KV cache: {free / 1e9:.1f} GB free, the "
                         f"engine's working set needs {(free - spare) / 1e9:.1f} GB (lower "
                         f"--max-num-seqs or --prefill-chunk)")
    return min(want, fit)


def check_pool_fits(cfg: Step3Config, num_pages: int, page_size: int, itemsize: int,
                    device) -> None:
    """Refuse a ``--num-pages`` the device cannot hold, before allocating it."""
    need, free = num_pages * page_bytes(cfg, page_size, itemsize), free_bytes(device)
    if free is not None and need > free:
        raise Step3Error(f"--num-pages {num_pages} x --page-size {page_size} needs "
                         f"{need / 1e9:.1f} GB of KV cache; {free / 1e9:.1f} GB is free")


def check_engine_args(max_num_seqs: int, page_size: int, num_pages: int,
                      prefill_chunk: int | None, decode_steps: int) -> None:
    for flag, value in (("--max-num-seqs", max_num_seqs), ("--page-size", page_size),
                        ("--num-pages", num_pages), ("--decode-steps", decode_steps)):
        if value < 1:
            raise Step3Error(f"{flag} must be >= 1, got {value}")
    if prefill_chunk is not None and prefill_chunk < 0:
        raise Step3Error(f"--prefill-chunk must be >= 0 (0: each prompt whole), got "
                         f"{prefill_chunk}")
