"""The Step-3.5 decoder's parts as pure functions (``shared/spec/step35.md`` §2).

* :func:`znorm` — zero-centred RMSNorm, ``x * rsqrt(mean(x²) + eps) * (1 + w)`` in float32;
* :func:`inv_freq` / :func:`partial_rope` — NeoX rotate-half RoPE on the leading ``rotary_dim``
  dims of each head (``theta^(-2j/r)``, denominator ``r``), llama3-scaled where the layer says;
* :func:`attention` — GQA with per-head QK norm before RoPE, the causal (and, on sliding layers,
  ``window``-token band) mask, the per-head sigmoid gate from the layer's normed input, o_proj;
  keys may come from a cache (:mod:`step3_jax.model.step35`) as well as from the chunk itself;
* :func:`clamped_swiglu`, :func:`route` and :func:`moe` — the FFNs: dense / shared / routed
  SwiGLU clamped at the layer's limits, the biased sigmoid router.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from step3_jax.model.layers import linear
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


def attention(p: Attention35, u: jax.Array, positions: jax.Array, spec: LayerSpec, eps: float,
              past=None):
    """Attention of layer ``spec`` on the normed input ``u [B, T, H]`` at ``positions [B, T]``.

    ``past``: ``None`` (the chunk attends to itself, causally) or ``(k, v, k_pos, k_valid,
    new_valid)``: cached keys/values ``[B, S, G, d]`` at positions ``k_pos [B, S]`` (valid where
    ``k_valid``), attended together with this chunk's own keys (valid where ``new_valid
    [B, T]``). Returns the block's output ``[B, T, H]`` and this chunk's ``(k, v)``.
    """
    q, k, v = project_qkv(p, u, positions, spec, eps)
    if past is None:
        keys, values, k_pos = k, v, positions
        k_valid = jnp.ones(positions.shape, bool)
    else:
        ck, cv, c_pos, c_valid, new_valid = past
        keys = jnp.concatenate([ck.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([cv.astype(v.dtype), v], axis=1)
        k_pos = jnp.concatenate([c_pos, positions], axis=1)
        k_valid = jnp.concatenate([c_valid, new_valid], axis=1)
    o = attend(q, keys, values, visible(positions, k_pos, k_valid, spec.window))
    return attention_output(p, u, o), (k, v)


# ----- FFN ------------------------------------------------------------------------------------------

def clamped_swiglu(y: jax.Array, gate, up, down, limit: float) -> jax.Array:
    """``(min(silu(y@gate.T), L) * clip(y@up.T, -L, L)) @ down.T`` for a limit ``L > 0``
    (upper-only on the activated gate, both sides on up; spec §2); plain SwiGLU for ``L = 0``."""
    g = jax.nn.silu(linear(y, gate))
    u = linear(y, up)
    if limit:
        g = jnp.minimum(g, limit)
        u = jnp.clip(u, -limit, limit)
    return linear(g * u, down)


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


def routed_experts(y: jax.Array, weights: jax.Array, idx: jax.Array, p: Moe35,
                   limit: float) -> jax.Array:
    """``sum_j weights[:, j] * Expert_idx[:, j](y)`` for ``y [N, H]``, every expert clamped at
    ``limit``. A scan over all experts, each on every token, weighted by a dense ``[N, E]``
    combine matrix (zero where unchosen): simple and exact, cost ``E`` experts per token --
    the reference kernel; the routed backends of :mod:`step3_jax.model.moe` are not wired in."""
    E = p.gate.shape[0]
    comb = jnp.zeros((y.shape[0], E), jnp.float32).at[
        jnp.arange(y.shape[0])[:, None], idx].add(weights.astype(jnp.float32))

    def one(out, xs):
        gate, up, down, c = xs
        h = clamped_swiglu(y, gate, up, down, limit).astype(jnp.float32)
        return out + h * c[:, None], None

    out, _ = jax.lax.scan(one, jnp.zeros(y.shape, jnp.float32), (p.gate, p.up, p.down, comb.T))
    return out.astype(y.dtype)


def moe(p: Moe35, y: jax.Array, spec: LayerSpec, cfg: Step35Config) -> jax.Array:
    """The MoE FFN on ``y [B, T, H]``: routed experts (clamped at ``spec.swiglu_limit``) plus
    the unscaled shared expert (clamped at ``spec.swiglu_limit_shared``)."""
    flat = y.reshape(-1, y.shape[-1])
    with jax.named_scope("moe_router"):
        weights, idx = route(flat, p, cfg)
    with jax.named_scope("moe_experts"):
        out = routed_experts(flat, weights, idx, p, spec.swiglu_limit).reshape(y.shape)
    if p.shared is not None:
        with jax.named_scope("shared_expert"):
            out = out + shared_ffn(p.shared, y, spec.swiglu_limit_shared)
    return out


def shared_ffn(p: Mlp, y: jax.Array, limit: float) -> jax.Array:
    """A dense layer's FFN or the shared expert: SwiGLU clamped at the ``_shared`` limit."""
    return clamped_swiglu(y, p.gate, p.up, p.down, limit)
