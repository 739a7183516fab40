"""MFA — Multi-Matrix Factorization Attention (``shared/spec/model.md`` §2).

A 2048-d low-rank query, RMS-normalized over the whole vector, expanded to 64 heads of 256; one K
head and one V head shared by every query head. Because the K/V head is shared, the 64 heads of a
token attend as one ``[heads, d] x [d, keys]`` matmul against the same keys.

:func:`attend_positions` is the attention core behind one switch (``cfg.attention_impl``): the
plain product of every score at once, or the blocked kernel (:mod:`.blocked_attention`) that
keeps one score tile and skips invisible key blocks; ``auto`` picks by shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from step3_jax.model.blocked_attention import blocked_attend, visible
from step3_jax.model.config import Step3Config
from step3_jax.model.layers import linear, rms_norm, rope
from step3_jax.model.quant import materialize
from step3_jax.model.weights import Attention

# Masked scores: the most negative float32, not -inf, so a row with no visible key (a padding
# slot) yields a finite uniform average instead of NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


def project_qkv(p: Attention, x: jax.Array, positions: jax.Array, cfg: Step3Config):
    """``x [B, T, H]`` -> rotated ``q [B, T, n, d]``, rotated ``k [B, T, d]`` and ``v [B, T, d]``."""
    q_lr = rms_norm(linear(x, p.q_proj), p.inter_norm, cfg.rms_norm_eps)  # norm over all of Q
    q = linear(q_lr, p.wq)  # wq [n, d, Q]: [B, T, n, d]
    q = rope(q, positions, cfg.rope_theta)
    k = rope(linear(x, p.k_proj), positions, cfg.rope_theta)
    v = linear(x, p.v_proj)
    return q, k, v


def attend(q: jax.Array, k_t: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of ``q [B, T, n, d]`` over the shared keys ``k_t [B, d, S]`` (transposed,
    as the KV cache stores them: the layout the score matmul reads in place) and values
    ``v [B, S, d]``. ``mask [B, T, S]`` is True where query ``t`` may see key ``s``. Scores and
    softmax in float32.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("btnd,bds->btns", q, k_t, preferred_element_type=jnp.float32) * scale
    return mix(scores, mask, v)


def mix(scores: jax.Array, mask: jax.Array, v: jax.Array) -> jax.Array:
    """The masked softmax of float32 ``scores [B, T, n, S]`` (``mask [B, T, S]``) applied to
    ``v [B, S, d]``: ``[B, T, n, d]``."""
    scores = jnp.where(mask[:, :, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("btns,bsd->btnd", probs.astype(v.dtype), v)


def output(p: Attention, o: jax.Array) -> jax.Array:
    """Heads ``[B, T, n, d]`` back to the model width through ``o_proj [H, n, d]``.

    As one ``[B, T, n*d] x [H, n*d]`` matmul on reshaped (bitcast) operands: a two-axis einsum
    made XLA:CPU transpose ``o_proj`` into a fresh buffer at every call (an 8 MB copy per layer
    and decode step on ``bench``; tools/profile_decode.py)."""
    hidden, n, d = p.o_proj.shape
    w = materialize(p.o_proj, o.dtype).reshape(hidden, n * d)
    return linear(o.reshape(*o.shape[:-2], n * d), w)


# ``auto``: the plain product for decode over at most PLAIN_MAX_KEYS cache slots and for prompt
# chunks of at most PLAIN_MAX_QUERIES tokens (there it is as fast: one query block, or a cache
# short enough that reading all of it costs no more than skipping), unless its float32 score
# array would pass PLAIN_MAX_SCORE_BYTES; the blocked kernel everywhere else: 2.4-3.4x faster
# than plain for 256-4096-token prefill on the bench shapes, 1.4-40x for decode at 16K-64K
# (tools/bench_attention.py, BENCHMARKS.md "Long context").
PLAIN_MAX_QUERIES = 128
PLAIN_MAX_KEYS = 8192
PLAIN_MAX_SCORE_BYTES = 2**30


def resolve_impl(cfg: Step3Config, batch: int, queries: int, heads: int, keys: int) -> str:
    """The attention kernel for ``queries`` queries of ``heads`` heads over ``keys`` key slots
    (shapes are static under jit, so the choice is made at trace time)."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    short = keys <= PLAIN_MAX_KEYS and queries <= PLAIN_MAX_QUERIES
    small = 4 * batch * queries * heads * keys <= PLAIN_MAX_SCORE_BYTES
    return "plain" if short and small else "blocked"


def attend_positions(q: jax.Array, k_t: jax.Array, v: jax.Array, q_pos: jax.Array,
                     key_len: jax.Array, cfg: Step3Config, window: int | None = None):
    """MFA's attention core behind one switch (``cfg.attention_impl``): query ``t`` of sequence
    ``b`` at position ``q_pos[b, t]`` sees key slot ``s`` (position ``s``) iff ``s <
    key_len[b]``, ``s <= q_pos[b, t]`` and, with a ``window``, ``q_pos[b, t] - s < window``.

    ``plain``: every score at once (:func:`attend`, ``[B, T, n, S]`` float32); ``blocked``:
    online softmax over key blocks that skips invisible ones
    (:func:`~step3_jax.model.blocked_attention.blocked_attend`, one score tile at a time)."""
    batch, queries, heads, _ = q.shape
    if resolve_impl(cfg, batch, queries, heads, k_t.shape[-1]) == "blocked":
        with jax.named_scope("attention_blocked"):
            return _blocked_on_mesh(q, k_t, v, q_pos, key_len, window)
    return plain_attend(q, k_t, v, q_pos, key_len, window)


def plain_attend(q, k_t, v, q_pos, key_len, window: int | None = None) -> jax.Array:
    """:func:`attend` with the visibility of :func:`attend_positions`: all ``[B, T, n, S]``
    float32 scores at once (fast for short prompts and short caches, O(T*S) memory)."""
    k_pos = jnp.arange(k_t.shape[-1], dtype=jnp.int32)[None]
    return attend(q, k_t, v, visible(q_pos, k_pos, key_len, window))


def _blocked_on_mesh(q, k_t, v, q_pos, key_len, window):
    """The blocked kernel on each device's own sequences and heads. It walks the batch one
    sequence at a time, which the SPMD partitioner cannot split: under a mesh (``jax.set_mesh``)
    whose ``dp`` splits the batch or ``tp`` the heads, it runs inside ``jax.shard_map`` on the
    local block (without, XLA gathers every device's KV cache onto each)."""
    from jax.sharding import PartitionSpec as P

    kernel = functools.partial(blocked_attend, window=window)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return kernel(q, k_t, v, q_pos, key_len)
    size = lambda axis: mesh.shape.get(axis, 1)  # noqa: E731
    dp = "dp" if size("dp") > 1 and q.shape[0] % size("dp") == 0 else None
    tp = "tp" if size("tp") > 1 and q.shape[2] % size("tp") == 0 else None
    if dp is None and tp is None:
        return kernel(q, k_t, v, q_pos, key_len)
    heads, rows = P(dp, None, tp, None), P(dp)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, rows, rows, rows, rows),
                         out_specs=heads, check_vma=False)(q, k_t, v, q_pos, key_len)
