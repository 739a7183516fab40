"""MFA — Multi-Matrix Factorization Attention (``shared/spec/model.md`` §2).

A 2048-d low-rank query, RMS-normalized over the whole vector, expanded to 64 heads of 256; one K
head and one V head shared by every query head. Because the K/V head is shared, the 64 heads of a
token attend as one ``[heads, d] x [d, keys]`` matmul against the same keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array) -> jax.Array:
    """``[B, T, S]``: key ``s`` visible to query ``t`` iff it is valid and not in the future."""
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
