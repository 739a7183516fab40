"""The functional KV cache: a pytree in, a pytree out.

MFA keeps one K head and one V head per layer, so the cache is, per layer, a K array
``[batch, head_dim, capacity]`` and a V array ``[batch, capacity, head_dim]`` (separate arrays, so
a layer reads its own without a slicing copy) plus each sequence's filled length. K is stored
transposed because that is the layout the score matmul ``q · Kᵀ`` reads in place: with K as
``[batch, capacity, head_dim]`` XLA:CPU transposed every layer's whole K cache into a new buffer
at every decode step (5x slower attention at batch 16 and context 1024; BENCHMARKS.md).
Sequences of different lengths share one cache: sequence ``b`` occupies positions
``0 .. lengths[b]-1``. Writes go through :func:`write_positions`, which routes any position at
or past the capacity to an out-of-bounds index dropped by the scatter — never the silent clamp of
``dynamic_update_slice``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from step3_jax.model.config import Step3Config


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [batch, head_dim, capacity]  (keys transposed)
    v: tuple[jax.Array, ...]  # per layer [batch, capacity, head_dim]
    lengths: jax.Array        # [batch] int32: positions filled so far

    @property
    def capacity(self) -> int:
        return self.v[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


# Logical axes of one layer's K and V arrays (the sharding rules table maps them to mesh axes).
# MFA's single K/V head cannot be split by heads, so the cache is split by batch (data-parallel
# attention).
K_AXES = ("batch", "head_dim", "cache_len")
V_AXES = ("batch", "cache_len", "head_dim")


def layer_shapes(cfg: Step3Config, batch: int, capacity: int):
    """The shapes of one layer's K and V arrays."""
    return (batch, cfg.head_dim, capacity), (batch, capacity, cfg.head_dim)


def init_cache(cfg: Step3Config, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``capacity`` positions."""
    k_shape, v_shape = layer_shapes(cfg, batch, capacity)
    dtype = jnp.dtype(dtype or cfg.dtype)
    layers = range(cfg.num_hidden_layers)
    return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(v_shape, dtype) for _ in layers),
                   lengths=jnp.zeros((batch,), jnp.int32))


def write_positions(lengths: jax.Array, num_new: jax.Array, chunk: int,
                    capacity: int) -> jax.Array:
    """Cache slots for a chunk of ``chunk`` new tokens per sequence, ``[batch, chunk]`` int32.

    Token ``t`` of sequence ``b`` goes to ``lengths[b] + t`` when ``t < num_new[b]`` and that slot
    exists; otherwise to ``capacity`` (out of bounds), which a ``mode="drop"`` scatter discards.
    """
    pos = lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    ok = (jnp.arange(chunk)[None, :] < num_new[:, None]) & (pos < capacity)
    return jnp.where(ok, pos, capacity)


def update(v_cache: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Scatter ``new [batch, chunk, ...]`` into a cache ``[batch, capacity, ...]`` at ``slots``
    (``[batch, chunk]``); out-of-bounds slots are dropped. Step-3's V ``[batch, capacity, d]``
    and Step-3.5's K and V ``[batch, slots, G, d]`` (``step35_layers``) both write here."""
    b = jnp.arange(slots.shape[0])[:, None]
    if slots.size == 1:  # XLA:CPU turns a one-update scatter into a copying select + DUS
        b, slots, new = _with_dropped_update(b, slots, new, v_cache.shape[1])
    return v_cache.at[b, slots].set(new.astype(v_cache.dtype), mode="drop")


def _with_dropped_update(b, slots, new, capacity):
    """A second, out-of-bounds (so dropped) update beside a single one. With one update XLA
    rewrites the scatter as a select and a dynamic-update-slice that read the old cache, and copy
    insertion then copies the layer's whole K and V cache four times per decode step (batch 1;
    tests/test_model.py::test_decode_loop_never_copies_the_kv_cache, BENCHMARKS.md)."""
    dropped = jnp.full_like(slots, capacity)
    return (jnp.concatenate([b, b], axis=1), jnp.concatenate([slots, dropped], axis=1),
            jnp.concatenate([new, new], axis=1))


def update_keys(k_cache: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Scatter ``new [batch, chunk, d]`` into one layer's transposed K ``[batch, d, capacity]``
    at ``slots``; out-of-bounds slots are dropped. (The two advanced indices around the slice
    index ``[batch, chunk]`` first, so the update is ``new`` as it is.)"""
    b = jnp.arange(slots.shape[0])[:, None]
    if slots.size == 1:
        b, slots, new = _with_dropped_update(b, slots, new, k_cache.shape[2])
    return k_cache.at[b, :, slots].set(new.astype(k_cache.dtype), mode="drop")
