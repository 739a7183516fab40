"""The Step-3.5 decoder's parts as pure functions (``shared/spec/step35.md`` §2).

* :func:`znorm` — zero-centred RMSNorm, ``x * rsqrt(mean(x²) + eps) * (1 + w)`` in float32;
* :func:`inv_freq` / :func:`partial_rope` — NeoX rotate-half RoPE on the leading ``rotary_dim``
  dims of each head (``theta^(-2j/r)``, denominator ``r``), llama3-scaled where the layer says;
* :func:`attention` — GQA with per-head QK norm before RoPE, the causal (and, on sliding layers,
  ``window``-token band) mask, the per-head sigmoid gate from the layer's normed input, o_proj;
  keys may come from a cache (:class:`CacheView`, built by :mod:`step3_jax.model.step35`) as
  well as from the chunk itself. The attention core is the plain product of every score
  (:func:`attend`) or, for long chunks and long caches, the blocked GQA kernel
  (:func:`~step3_jax.model.blocked_attention.gqa_attend`: one score tile at a time, invisible
  key blocks skipped), chosen by :func:`resolve_impl`;
* :func:`clamped_swiglu`, :func:`route` and :func:`moe` — the FFNs: dense / shared / routed
  SwiGLU clamped at the layer's limits, the biased sigmoid router. The routed experts run on
  Step-3's per-backend kernels (:func:`step3_jax.model.moe.experts`), clamped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from step3_jax.model.attention import PLAIN_MAX_SCORE_BYTES
from step3_jax.model.blocked_attention import gqa_attend
from step3_jax.model.cache import update
from step3_jax.model.layers import linear
from step3_jax.model.moe import clamped_swiglu, experts
from step3_jax.model.step35_config import LayerSpec, RopeScaling, Step35Config
from step3_jax.model.step35_weights import Attention35, Moe35
from step3_jax.model.weights import Mlp

# Masked scores: the most negative float32, not -inf, so a query with no visible key (a padding
# row) yields a finite average instead of NaN.
_MASKED = float(np.finfo(np.float32).min)


def znorm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Zero-centred RMSNorm over the last axis: normalize and scale by ``1 + w`` in float32,
    then cast back to ``x``'s dtype (spec §2: the cast comes after the multiply)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """The ``rotary_dim / 2`` inverse frequencies ``theta^(-2j/r)`` (float64, a trace-time
    constant), llama3-scaled when ``scaling`` is given: wavelength ``λ = 2π/f`` above
    ``orig/low`` divides ``f`` by ``factor``; below ``orig/high`` keeps it; in between
    ``(1-m)·f/factor + m·f`` with ``m = (orig/λ - low)/(high - low)``."""
    f = float(theta) ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if scaling is None:
        return f
    orig, low, high = (scaling.original_max_position_embeddings, scaling.low_freq_factor,
                       scaling.high_freq_factor)
    lam = 2 * math.pi / f
    m = (orig / lam - low) / (high - low)
    mid = (1 - m) * f / scaling.factor + m * f
    return np.where(lam > orig / low, f / scaling.factor, np.where(lam < orig / high, f, mid))


def partial_rope(x: jax.Array, positions: jax.Array, spec: LayerSpec) -> jax.Array:
    """RoPE on the leading ``spec.rotary_dim`` dims of each head of ``x [B, T, heads, d]`` at
    ``positions [B, T]`` (absolute); the trailing ``d - r`` dims pass through unchanged.
    Within the rotated part: angles ``concat(f, f) * pos``, ``rot(z) = concat(-z2, z1)``."""
    r = spec.rotary_dim
    if r == 0:
        return x
    freq = jnp.asarray(inv_freq(r, spec.rope_theta, spec.rope_scaling), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * freq           # [B, T, r/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, r]
    x32 = x.astype(jnp.float32)
    z, rest = x32[..., :r], x32[..., r:]
    rotated = jnp.concatenate([-z[..., r // 2:], z[..., : r // 2]], axis=-1)
    z = z * jnp.cos(angles) + rotated * jnp.sin(angles)
    return jnp.concatenate([z, rest], axis=-1).astype(x.dtype)


def project_qkv(p: Attention35, u: jax.Array, positions: jax.Array, spec: LayerSpec,
                eps: float):
    """``u [B, T, H]`` (the input-normed hidden states) -> ``q [B, T, n, d]`` and
    ``k, v [B, T, G, d]``: QK zero-centred norm over ``d`` per head, then partial RoPE."""
    q = znorm(linear(u, p.q_proj), p.q_norm, eps)
    k = znorm(linear(u, p.k_proj), p.k_norm, eps)
    v = linear(u, p.v_proj)
    return partial_rope(q, positions, spec), partial_rope(k, positions, spec), v


def visible(q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array,
            window: int | None) -> jax.Array:
    """``[B, T, S]``: query at ``q_pos [B, T]`` sees key at ``k_pos [B, S]`` iff the key is
    valid, ``k_pos <= q_pos`` and, with a window ``w``, ``q_pos - w < k_pos`` (``w`` positions
    visible, the query's own included; spec §2 step 5)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    ok = k_valid[:, None, :] & (kp <= qp)
    if window is not None:
        ok &= qp - kp < window
    return ok


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA softmax attention: ``q [B, T, n, d]`` over ``k, v [B, S, G, d]``; query head ``h``
    reads K/V head ``h // (n / G)``. Scale ``1/sqrt(d)``, scores and softmax in float32.
    ``mask [B, T, S]``. Returns ``[B, T, n, d]``."""
    B, T, n, d = q.shape
    G = k.shape[2]
    qg = q.reshape(B, T, G, n // G, d)
    scores = jnp.einsum("btgrd,bsgd->btgrs", qg, k,
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, :, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("btgrs,bsgd->btgrd", probs.astype(v.dtype), v)
    return o.reshape(B, T, n, d)


def attention_output(p: Attention35, u: jax.Array, o: jax.Array) -> jax.Array:
    """The per-head sigmoid gate ``sigmoid(u @ g_proj.T)`` (from the same normed input ``u``)
    on the heads ``o [B, T, n, d]``, then ``o_proj``."""
    gate = jax.nn.sigmoid(linear(u, p.g_proj).astype(jnp.float32)).astype(o.dtype)
    o = o * gate[..., None]
    hidden, n, d = p.o_proj.shape
    return linear(o.reshape(*o.shape[:-2], n * d), p.o_proj.reshape(hidden, n * d))


class CacheView(NamedTuple):
    """One layer's K/V cache as :func:`attention` reads and updates it (``step35.layer`` builds
    it; the slot bookkeeping is :mod:`step3_jax.model.step35`'s): ``k``, ``v [B, S, G, d]``;
    ``lengths [B]`` tokens held before the chunk, ``num_new [B]`` real tokens in it;
    ``slot_pos`` / ``slot_pos_after [B, S]`` the position each slot holds before / after the
    chunk is written (-1: empty); ``write [B, T]`` the slot each new token goes to (``S``: not
    written)."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    num_new: jax.Array
    slot_pos: jax.Array
    slot_pos_after: jax.Array
    write: jax.Array


# ``auto``: the plain product only over at most PLAIN_MAX_KEYS key slots (and scores under
# attention.PLAIN_MAX_SCORE_BYTES). XLA:CPU runs the plain GQA product (``attend``'s grouped
# einsums) far slower than Step-3's one-head one: on the step35-bench heads (16 or 24 of 128 over
# 2 K/V heads) the blocked kernel was 1.3-2.3x faster for one decode query over 513 keys at
# batch 16 (a sliding layer's ring: 4.1 against 9.5 ms with 24 heads), 1.4-5x over 2,048-32,768
# keys, and 2.4-6x for 64-query chunks over 2,048; plain was ahead only at batch 1 over 513 keys
# with 16 heads (0.65 against 0.86 ms; with 24: 0.52 blocked, 0.65 plain). Standalone timings of
# the two cores on the loaded 2-core machine (BENCHMARKS.md, "Step-3.5 beside Step-3").
PLAIN_MAX_KEYS = 256


def resolve_impl(impl: str, batch: int, queries: int, heads: int, keys: int) -> str:
    """The attention core for ``queries`` queries of ``heads`` heads over ``keys`` key slots:
    ``impl`` unless ``"auto"``, then the plain product for at most :data:`PLAIN_MAX_KEYS` keys
    while its float32 scores stay small (tests, short prompts), the blocked kernel elsewhere."""
    if impl != "auto":
        return impl
    small = 4 * batch * queries * heads * keys <= PLAIN_MAX_SCORE_BYTES
    return "plain" if keys <= PLAIN_MAX_KEYS and small else "blocked"


def _ring_in_order(cache: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """A sliding layer's ring ``[B, W, G, d]`` (slot = position mod ``window``) laid out in
    position order: entry ``i`` holds position ``lengths - W + i`` (unfilled entries, negative
    positions, read slot 0: finite values that the caller masks)."""
    slots = cache.shape[1]
    pos = lengths[:, None] - slots + jnp.arange(slots, dtype=jnp.int32)[None, :]
    ring = jnp.clip(jnp.where(pos >= 0, pos % window, 0), 0, slots - 1)
    return jnp.take_along_axis(cache, ring[:, :, None, None], axis=1)


def _cached(q, k, v, positions, spec: LayerSpec, view: CacheView, impl: str):
    """Attention of a chunk over a layer's cache and itself; returns ``o`` and the cache with
    the chunk written. Full layers (slot = position) and single-token steps write first, then
    read the cache in place, the chunk's keys among them (after one token's write a ring holds
    exactly the positions inside its window, in some slot order: the softmax does not mind).
    Longer chunks on sliding layers read first (they would overwrite keys their own earlier
    queries need), over the ring and the chunk side by side."""
    batch, chunk, heads, _ = q.shape
    slots = view.k.shape[1]
    if spec.window is None or chunk == 1:
        kc, vc = update(view.k, view.write, k), update(view.v, view.write, v)
        if resolve_impl(impl, batch, chunk, heads, slots) == "blocked":
            with jax.named_scope("attention_blocked"):
                key_len = jnp.minimum(view.lengths + view.num_new, slots)
                # Sliding: every filled slot is visible, so the query sits past them all.
                q_pos = positions if spec.window is None else jnp.full_like(positions,
                                                                           slots - 1)
                o = gqa_attend(q, kc, vc, q_pos, key_len)
        else:
            pos = view.slot_pos_after
            o = attend(q, kc, vc, visible(positions, pos, pos >= 0, spec.window))
        return o, (kc, vc)
    new_valid = jnp.arange(chunk, dtype=jnp.int32)[None, :] < view.num_new[:, None]
    if resolve_impl(impl, batch, chunk, heads, slots + chunk) == "blocked":
        with jax.named_scope("attention_blocked"):
            # Ring (in position order) then chunk: entry s holds position s + lengths - W.
            keys = jnp.concatenate([_ring_in_order(view.k, view.lengths, spec.window),
                                    k.astype(view.k.dtype)], axis=1)
            values = jnp.concatenate([_ring_in_order(view.v, view.lengths, spec.window),
                                      v.astype(view.v.dtype)], axis=1)
            o = gqa_attend(q, keys, values, positions - view.lengths[:, None] + slots,
                           slots + view.num_new, jnp.maximum(slots - view.lengths, 0),
                           window=spec.window)
    else:
        keys = jnp.concatenate([view.k.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([view.v.astype(v.dtype), v], axis=1)
        k_pos = jnp.concatenate([view.slot_pos, positions], axis=1)
        k_valid = jnp.concatenate([view.slot_pos >= 0, new_valid], axis=1)
        o = attend(q, keys, values, visible(positions, k_pos, k_valid, spec.window))
    return o, (update(view.k, view.write, k), update(view.v, view.write, v))


def attention(p: Attention35, u: jax.Array, positions: jax.Array, spec: LayerSpec, eps: float,
              past: CacheView | None = None, impl: str = "auto"):
    """Attention of layer ``spec`` on the normed input ``u [B, T, H]`` at consecutive
    ``positions [B, T]``; ``impl``: ``cfg.attention_impl`` (``auto``, ``plain``, ``blocked``).

    ``past``: ``None`` (the chunk attends to itself, causally; returns the block's output
    ``[B, T, H]`` and this chunk's ``(k, v)``) or a :class:`CacheView` (the chunk attends over
    the cached keys and its own; returns the output and the view's ``(k, v)`` caches with the
    chunk written at ``past.write``).
    """
    q, k, v = project_qkv(p, u, positions, spec, eps)
    batch, chunk, heads, _ = q.shape
    if past is not None:
        o, new_kv = _cached(q, k, v, positions, spec, past, impl)
        return attention_output(p, u, o), new_kv
    if resolve_impl(impl, batch, chunk, heads, chunk) == "blocked":
        with jax.named_scope("attention_blocked"):
            o = gqa_attend(q, k, v, positions - positions[:, :1],
                           jnp.full((batch,), chunk, jnp.int32), window=spec.window)
    else:
        o = attend(q, k, v, visible(positions, positions, jnp.ones(positions.shape, bool),
                                    spec.window))
    return attention_output(p, u, o), (k, v)


# ----- FFN ------------------------------------------------------------------------------------------

def route(y: jax.Array, p: Moe35, cfg: Step35Config):
    """Sigmoid router for tokens ``y [N, H]``: top-k of ``sigmoid(y @ router.T) + router_bias``
    (the bias only chooses), weights from the unbiased scores, renormalized to sum 1 (when
    ``norm_expert_weight``), then times ``moe_router_scaling_factor``. All float32.
    Returns ``(weights [N, k], idx [N, k])``."""
    scores = jax.nn.sigmoid(linear(y.astype(jnp.float32), p.router.astype(jnp.float32)))
    choice = scores if p.router_bias is None else scores + p.router_bias.astype(jnp.float32)
    _, idx = jax.lax.top_k(choice, cfg.moe_top_k)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_expert_weight:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * cfg.moe_router_scaling_factor, idx


def moe(p: Moe35, y: jax.Array, spec: LayerSpec, cfg: Step35Config, routing=None) -> jax.Array:
    """The MoE FFN on ``y [B, T, H]``: routed experts (clamped at ``spec.swiglu_limit``) on
    ``cfg.moe_impl``'s kernel (:func:`step3_jax.model.moe.experts`, expert-parallel under a
    mesh) plus the unscaled shared expert (clamped at ``spec.swiglu_limit_shared``).
    ``routing``: ``(weights, idx) [B, T, k]`` computed elsewhere (AFD routes on the attention
    side, where ``p.router`` lives); default: :func:`route` here."""
    if routing is None:
        with jax.named_scope("moe_router"):
            weights, idx = route(y.reshape(-1, y.shape[-1]), p, cfg)
        routing = (weights.reshape(*y.shape[:-1], -1), idx.reshape(*y.shape[:-1], -1))
    out = experts(y, *routing, p, cfg, spec.swiglu_limit)
    if p.shared is not None:
        with jax.named_scope("shared_expert"):
            out = out + shared_ffn(p.shared, y, spec.swiglu_limit_shared)
    return out


def shared_ffn(p: Mlp, y: jax.Array, limit: float) -> jax.Array:
    """A dense layer's FFN or the shared expert: SwiGLU clamped at the ``_shared`` limit."""
    return clamped_swiglu(y, p.gate, p.up, p.down, limit)
