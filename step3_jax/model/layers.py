"""The small shared pieces: RMSNorm, NeoX rotary embeddings, SwiGLU, and the matmul helper."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from step3_jax.model.quant import materialize

# Up to this many rows (decode batches; not prefill) XLA:CPU gets the weight-major product below.
SMALL_ROWS = 256


def linear(x: jax.Array, w) -> jax.Array:
    """``x @ w.T``, the one matmul entry point: contracts ``x``'s last axis with the last axis of
    ``w [*out, in]`` (the Hub layout) and returns ``[*x.shape[:-1], *out]``. ``w`` is an array
    or a block-FP8 ``quant.Fp8Weight`` (dequantized to ``x``'s dtype).

    On XLA:CPU with fewer than :data:`SMALL_ROWS` rows the product is formed as ``(w @ xᵀ)ᵀ``,
    with an optimization barrier before the transpose: XLA would otherwise fold the transpose into
    the dot's output layout, and that form reads the weight 1.6-2.6x slower at 4-16 rows
    (BENCHMARKS.md, "Weight layout"). The transpose then copies only the small result.
    """
    w = materialize(w, x.dtype)
    lead, out, k = x.shape[:-1], w.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    if rows < SMALL_ROWS and jax.default_backend() == "cpu":
        y = jax.lax.dot_general(w.reshape(-1, k), x.reshape(rows, k), (((1,), (1,)), ((), ())))
        return jax.lax.optimization_barrier(y).T.reshape(*lead, *out)
    return jnp.tensordot(x, w, axes=((x.ndim - 1,), (w.ndim - 1,)))


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Normalize in float32, cast back to the activation dtype, then scale by ``w`` (not 1+w)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * w


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """NeoX rotate-half rotary embedding over the full last axis.

    ``x``: ``[B, T, ..., d]``; ``positions``: ``[B, T]`` integer positions. The angle table is
    ``concat(f, f)`` with ``f = pos * theta^(-arange(0, d, 2)/d)``; ``rot(x) = concat(-x2, x1)``.
    """
    d = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (d,))
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """``down(silu(x @ gate) * (x @ up))`` — dense layers and the shared expert."""
    return linear(jax.nn.silu(linear(x, gate)) * linear(x, up), down)
