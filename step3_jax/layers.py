"""The small shared pieces: RMSNorm, NeoX rotary embeddings, SwiGLU, and the matmul helper."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from step3_jax.quant import materialize


def linear(x: jax.Array, w) -> jax.Array:
    """``x @ w`` contracting ``x``'s last axis with ``w``'s first; the one matmul entry point.
    ``w`` is an array or a block-FP8 ``quant.Fp8Weight`` (dequantized to ``x``'s dtype)."""
    return jnp.tensordot(x, materialize(w, x.dtype), axes=((x.ndim - 1,), (0,)))


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
