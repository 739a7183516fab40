"""Routed MoE plus the shared expert, with one implementation per backend.

Routing (``shared/spec/model.md`` §2): ``softmax(y @ router)`` in float32 over all experts, top-k
of the probabilities, no renormalization (unless ``norm_expert_weight``), no scaling factor, no
bias. The shared expert is always added with weight 1 on the same input.

Expert compute — same result, different cost model (``shared/spec/cpu-performance.md``):

* ``"loop"`` (XLA:CPU): a loop over the experts that reads each *used* expert's weights once, in
  place, skips unused ones with ``lax.cond``, and gathers only that expert's tokens in fixed-size
  slots of ``C`` rows, looping over as many slots as its load needs — dropless without
  recompiling. Cost follows the activated experts, within ~1.5x of the memory roofline.
* ``"ragged"`` (GPU/TPU): sort token-expert pairs by expert and run grouped ``lax.ragged_dot``
  kernels. On XLA:CPU ``ragged_dot`` is ~200x off the roofline, hence the split.

``"auto"`` picks ``loop`` on CPU and ``ragged`` elsewhere. Both are tested against each other and
against the NumPy reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from step3_jax.config import Step3Config
from step3_jax.layers import linear, swiglu
from step3_jax.weights import Moe


def route(y: jax.Array, router: jax.Array, cfg: Step3Config):
    """Top-k expert weights ``[N, k]`` (float32) and indices ``[N, k]`` for tokens ``y [N, H]``."""
    logits = linear(y.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, idx = jax.lax.top_k(probs, cfg.moe_top_k)
    if cfg.norm_expert_weight:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, idx


def _sort_by_expert(weights: jax.Array, idx: jax.Array, num_experts: int):
    """Token-expert pairs sorted by expert: token ids, combine weights, and per-expert counts."""
    n, k = idx.shape
    flat_e = idx.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    tokens = (jnp.arange(n * k, dtype=jnp.int32) // k)[order]
    counts = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
    return tokens, weights.reshape(-1)[order], counts


def slot_rows(num_tokens: int, cfg: Step3Config) -> int:
    """Rows per expert slot for the loop kernel (static).

    Up to 64 tokens, one slot holds every token an expert can receive (an expert appears at most
    once per token), so each used expert's weights are read exactly once — the decode regime.
    Beyond that, twice the mean load rounded up to a power of two: larger batches loop over a few
    slots instead of padding every expert to the batch.
    """
    if num_tokens <= 64:
        return num_tokens
    mean_load = -(-num_tokens * cfg.moe_top_k // cfg.moe_num_experts)
    return min(num_tokens, max(64, 1 << (2 * mean_load - 1).bit_length()))


def _experts_loop(y, weights, idx, p: Moe, cfg: Step3Config) -> jax.Array:
    n = y.shape[0]
    num_experts = p.gate.shape[0]
    rows = slot_rows(n, cfg)
    tokens, comb, counts = _sort_by_expert(weights, idx, num_experts)
    starts = jnp.cumsum(counts) - counts
    # Pad so a slot starting anywhere in the sorted list stays in bounds (no clamped slices).
    tokens = jnp.concatenate([tokens, jnp.zeros((rows,), tokens.dtype)])
    comb = jnp.concatenate([comb, jnp.zeros((rows,), comb.dtype)])

    def expert(e, out):
        def run(out):
            gate = jax.lax.dynamic_index_in_dim(p.gate, e, keepdims=False)
            up = jax.lax.dynamic_index_in_dim(p.up, e, keepdims=False)
            down = jax.lax.dynamic_index_in_dim(p.down, e, keepdims=False)

            def slot(s, out):
                first = starts[e] + s * rows
                tok = jax.lax.dynamic_slice_in_dim(tokens, first, rows)
                w = jax.lax.dynamic_slice_in_dim(comb, first, rows)
                w = jnp.where(s * rows + jnp.arange(rows) < counts[e], w, 0.0)
                h = swiglu(y[tok], gate, up, down)
                return out.at[tok].add(h.astype(jnp.float32) * w[:, None])

            return jax.lax.fori_loop(0, (counts[e] + rows - 1) // rows, slot, out)

        return jax.lax.cond(counts[e] > 0, run, lambda out: out, out)

    out = jax.lax.fori_loop(0, num_experts, expert, jnp.zeros(y.shape, jnp.float32))
    return out.astype(y.dtype)


def _experts_ragged(y, weights, idx, p: Moe, cfg: Step3Config) -> jax.Array:
    tokens, comb, counts = _sort_by_expert(weights, idx, p.gate.shape[0])
    x = y[tokens]
    h = jax.nn.silu(jax.lax.ragged_dot(x, p.gate, counts)) * jax.lax.ragged_dot(x, p.up, counts)
    o = jax.lax.ragged_dot(h, p.down, counts)
    out = jnp.zeros(y.shape, jnp.float32).at[tokens].add(o.astype(jnp.float32) * comb[:, None])
    return out.astype(y.dtype)


def resolve_impl(cfg: Step3Config) -> str:
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    return "loop" if jax.default_backend() == "cpu" else "ragged"


def routed_experts(y: jax.Array, weights: jax.Array, idx: jax.Array, p: Moe,
                   cfg: Step3Config) -> jax.Array:
    """``sum_j weights[:, j] * Expert[idx[:, j]](y)`` for ``y [N, H]``, on the backend's kernel."""
    impl = _experts_loop if resolve_impl(cfg) == "loop" else _experts_ragged
    return impl(y, weights, idx, p, cfg)


def moe(p: Moe, y: jax.Array, cfg: Step3Config) -> jax.Array:
    """The MoE FFN of one layer on ``y [..., H]``: routed experts plus the shared expert."""
    shape = y.shape
    y = y.reshape(-1, shape[-1])
    with jax.named_scope("moe_router"):
        weights, idx = route(y, p.router, cfg)
    with jax.named_scope("moe_experts"):
        out = routed_experts(y, weights, idx, p, cfg)
    with jax.named_scope("shared_expert"):
        out = out + swiglu(y, p.shared.gate, p.shared.up, p.shared.down)
    return out.reshape(shape)
