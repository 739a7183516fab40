"""The paged KV cache: per layer, a pool of fixed-size pages that sequences hold through a page
table, so memory follows the tokens actually held, not ``sequences x max_context``.

Each layer describes its own cache (:func:`layer_specs`: K/V heads, head size, sliding window);
Step-3's MFA layers all hold one K head and one V head of ``head_dim`` and no window. A layer's
pool is a K array ``[num_pages, head_dim, page_size]`` — K transposed inside each page, the
layout the score product ``q · Kᵀ`` reads in place, as in the contiguous cache (``cache.py``) —
and a V array ``[num_pages, page_size, head_dim]``. A sequence's page table row ``[W]`` lists
its pages in position order: position ``p`` lives at slot ``p % page_size`` of page
``table[p // page_size]``. Which pages a sequence holds is the engine's business
(:mod:`step3_jax.runtime.engine`); here are the device-side writes and reads.

Attention over pages (:func:`attend`) takes one of two roads, chosen by shape like the
contiguous cache's kernels (``attention.resolve_impl``):

* ``gather``: copy each row's pages into a ``[B, W, d, page]`` view and run the plain product
  over it — one einsum over (page, slot) without any transpose. For short prompt chunks and one
  sequence's decode over a short cache (:func:`paged_impl`).
* ``blocked``: the online-softmax kernel reading each key block's pages from the pool in place
  (``blocked_attention._paged_block``): no copy of the cache, causal/filled blocks skipped.

``tools/bench_engine.py`` measures both against the contiguous cache (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from step3_jax.model.attention import mix, resolve_impl
from step3_jax.model.blocked_attention import blocked_attend, visible
from step3_jax.model.config import Step3Config


@dataclasses.dataclass(frozen=True)
class LayerCacheSpec:
    """What one layer keeps per cached token: ``kv_heads`` K and V heads of ``head_dim``, and
    a sliding ``window`` (None: every position) past which its pages could be recycled."""

    kv_heads: int
    head_dim: int
    window: int | None = None


def layer_specs(cfg: Step3Config) -> tuple[LayerCacheSpec, ...]:
    """Every layer's cache description. Step-3: one K/V head of ``head_dim``, full context."""
    spec = LayerCacheSpec(cfg.num_attention_groups, cfg.head_dim)
    return (spec,) * cfg.num_hidden_layers


def page_bytes(cfg: Step3Config, page_size: int, itemsize: int) -> int:
    """Bytes of one page across every layer (K and V)."""
    return sum(2 * s.kv_heads * s.head_dim * page_size * itemsize for s in layer_specs(cfg))


@struct.dataclass
class PagedCache:
    k: tuple[jax.Array, ...]  # per layer [num_pages, head_dim, page_size]  (keys transposed)
    v: tuple[jax.Array, ...]  # per layer [num_pages, page_size, head_dim]

    @property
    def num_pages(self) -> int:
        return self.v[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.v[0].shape[1]


def init_pages(cfg: Step3Config, num_pages: int, page_size: int, dtype=None,
               sharding=None) -> PagedCache:
    """An empty pool of ``num_pages`` pages of ``page_size`` slots per layer (on ``sharding``
    when given)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    ks, vs = [], []
    for spec in layer_specs(cfg):
        if spec.kv_heads != 1:
            raise NotImplementedError("paged layers with more than one K/V head")
        ks.append(jnp.zeros((num_pages, spec.head_dim, page_size), dtype, device=sharding))
        vs.append(jnp.zeros((num_pages, page_size, spec.head_dim), dtype, device=sharding))
    return PagedCache(k=tuple(ks), v=tuple(vs))


def pool_slots(table: jax.Array, lengths: jax.Array, num_new: jax.Array, chunk: int,
               page_size: int, num_pages: int) -> jax.Array:
    """Flat pool slots (``page * page_size + offset``) for a chunk of ``chunk`` new tokens per
    row, ``[B, chunk]`` int32: token ``t`` of row ``b`` (position ``lengths[b] + t``) when
    ``t < num_new[b]``, otherwise ``num_pages * page_size`` (out of bounds: the write drops it).
    The caller guarantees the row's table holds a page for every written position."""
    pos = lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    col = jnp.clip(pos // page_size, 0, table.shape[1] - 1)
    page = jnp.take_along_axis(table, col, axis=1)
    ok = jnp.arange(chunk)[None, :] < num_new[:, None]
    return jnp.where(ok, page * page_size + pos % page_size, num_pages * page_size)


def write(k_pages: jax.Array, v_pages: jax.Array, slots: jax.Array, k_new: jax.Array,
          v_new: jax.Array):
    """Scatter ``k_new``/``v_new [B, T, d]`` into one layer's pools at flat ``slots [B, T]``;
    out-of-bounds slots are dropped. (The two advanced indices around K's slice index
    ``[B, T]`` first, so the update is ``k_new`` as it is.)"""
    page_size = v_pages.shape[1]
    if slots.size == 1:  # XLA:CPU copies the whole pool for a one-update scatter (cache.py)
        slots = jnp.concatenate([slots, jnp.full_like(slots, v_pages.shape[0] * page_size)], 1)
        k_new, v_new = (jnp.concatenate([x, x], axis=1) for x in (k_new, v_new))
    page, off = slots // page_size, slots % page_size
    k_pages = k_pages.at[page, :, off].set(k_new.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page, off].set(v_new.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


# Decode over pages: gather only for one sequence over at most this many keys. Measured
# (tools/bench_engine.py, BENCHMARKS.md "Engine"), one layer's decode attention: gather 0.50 ms
# against blocked 0.70 at 1024 keys and batch 1, but 3.09 against 2.31 at 4096 x 1 and 56.3
# against 22.3 at 4096 x 8 (the gather copies every row's pages; blocked reads them in place).
GATHER_MAX_DECODE_KEYS = 1024


def paged_impl(cfg: Step3Config, batch: int, queries: int, heads: int, keys: int) -> str:
    """The road over pages: ``blocked`` wherever the contiguous cache would take the blocked
    kernel, and for decode steps except one sequence over a short cache; ``gather`` (then the
    plain product) for short prompt chunks and that one case. ``--attention-impl plain`` /
    ``blocked`` force ``gather`` / ``blocked``."""
    plain = resolve_impl(cfg, batch, queries, heads, keys) == "plain"
    if cfg.attention_impl != "auto" or not plain or queries > 1:
        return "gather" if plain else "blocked"
    return "gather" if batch == 1 and keys <= GATHER_MAX_DECODE_KEYS else "blocked"


def attend_pages(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array,
                 q_pos: jax.Array, key_len: jax.Array, cfg: Step3Config,
                 window: int | None = None, impl: str | None = None) -> jax.Array:
    """Attention of ``q [B, T, n, d]`` at positions ``q_pos [B, T]`` over each row's pages
    (``table [B, W]``), the visibility rule of ``attention.attend_positions`` with position =
    slot index in the row's page order; ``impl`` (``gather``/``blocked``) overrides the
    shape-based choice."""
    batch, queries, heads, _ = q.shape
    width, page = table.shape[1], v_pages.shape[1]
    impl = impl or paged_impl(cfg, batch, queries, heads, width * page)
    if impl == "blocked":
        with jax.named_scope("attention_paged_blocked"):
            return blocked_attend(q, k_pages, v_pages, q_pos, key_len, window=window,
                                  table=table)
    with jax.named_scope("attention_paged_gather"):
        keys = jnp.take(k_pages, table, axis=0)  # [B, W, d, page]
        values = jnp.take(v_pages, table, axis=0).reshape(batch, width * page, -1)
        scale = q.shape[-1] ** -0.5
        scores = jnp.einsum("btnd,bwds->btnws", q, keys, preferred_element_type=jnp.float32)
        scores = scores.reshape(batch, queries, heads, width * page) * scale
        k_pos = jnp.arange(width * page, dtype=jnp.int32)[None]
        return mix(scores, visible(q_pos, k_pos, key_len, window), values)
