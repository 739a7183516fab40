"""Routed MoE plus the shared expert, with one implementation per backend.

Routing (``shared/spec/model.md`` §2): ``softmax(y @ router)`` in float32 over all experts, top-k
of the probabilities, no renormalization (unless ``norm_expert_weight``), no scaling factor, no
bias. The shared expert is always added with weight 1 on the same input.

The expert kernels serve both families: they take the routing ``(weights, idx)`` computed by the
family's router (Step-3.5's biased sigmoid one is ``step35_layers.route``), the experts from any
layer record with stacked or per-expert ``gate``/``up``/``down``, and an optional clamp ``limit``
(Step-3.5's clamped SwiGLU, :func:`clamped_swiglu`; 0 is plain SwiGLU, Step-3's). The config is
read only for ``moe_impl``, ``moe_num_experts`` and ``moe_top_k``, which both families spell
alike.

Expert compute — same result, different cost model (``shared/spec/cpu-performance.md``):

* ``"loop"`` (XLA:CPU): a loop over the experts some token chose (unused ones cost nothing), reads
  each used expert's weights in place (on the per-expert layout, ``weights.unstack_experts``),
  and gathers only that expert's tokens in fixed-size slots, looping over as many slots as its
  load needs — dropless without recompiling. Cost follows the activated experts.
* ``"ragged"`` (GPU/TPU): sort token-expert pairs by expert and run grouped ``lax.ragged_dot``
  kernels. On XLA:CPU ``ragged_dot`` is ~200x off the roofline, hence the split.
* ``"blocks"`` (training on XLA:CPU): token-expert pairs sorted by expert, each expert's group
  padded to whole blocks of rows, then a ``lax.scan`` over the blocks, each block one expert's
  SwiGLU. Static shapes and dropless (the row count is bounded by ``N*k + E*block``), and
  reverse-differentiable, unlike the loop kernel's data-dependent trip counts; with many tokens
  per step it runs the expert FLOPs at matmul speed (``step3_jax/training/train.py`` picks it).

``"auto"`` picks ``loop`` on CPU and ``ragged`` elsewhere. Both are tested against each other and
against the NumPy reference; ``blocks`` against both, and its gradients against ``ragged_dot``'s
(``tests/test_train.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from step3_jax.errors import ConfigError
from step3_jax.model.config import Step3Config
from step3_jax.model.layers import linear, swiglu
from step3_jax.model.quant import BLOCK, Fp8Weight, materialize
from step3_jax.model.weights import Moe, stack_weight


def _activate(g: jax.Array, u: jax.Array, limit: float) -> jax.Array:
    """The SwiGLU product of gate and up projections ``g``, ``u``: ``silu(g) * u``, or for a
    limit ``L > 0`` ``min(silu(g), L) * clip(u, -L, L)`` (upper only on the activated gate, both
    sides on up: ``shared/spec/step35.md`` §2)."""
    if not limit:
        return jax.nn.silu(g) * u
    return jnp.minimum(jax.nn.silu(g), limit) * jnp.clip(u, -limit, limit)


def clamped_swiglu(x: jax.Array, gate, up, down, limit: float = 0.0) -> jax.Array:
    """``activate(x@gate.T, x@up.T) @ down.T`` clamped at ``limit`` (:func:`_activate`); for
    ``limit = 0`` the same operations as :func:`~step3_jax.model.layers.swiglu`."""
    return linear(_activate(linear(x, gate), linear(x, up), limit), down)


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
    """Rows per expert slot for the loop kernel (static): the mean expert load, rounded up to a
    power of two. An expert with more tokens loops over more slots (its weights stay in cache);
    one with fewer pads its slot. Sizing slots to the whole batch instead made every used expert
    multiply ``num_tokens`` rows for ~1 real token at decode batch 16 (BENCHMARKS.md).
    """
    mean_load = -(-num_tokens * cfg.moe_top_k // cfg.moe_num_experts)
    return min(num_tokens, 1 << (mean_load - 1).bit_length())


def _experts_loop(y, weights, idx, p: Moe, cfg: Step3Config, limit: float) -> jax.Array:
    n = y.shape[0]
    per_expert = isinstance(p.gate, (tuple, list))
    num_experts = len(p.gate) if per_expert else p.gate.shape[0]
    rows = slot_rows(n, cfg)
    tokens, comb, counts = _sort_by_expert(weights, idx, num_experts)
    starts = jnp.cumsum(counts) - counts
    # Pad so a slot starting anywhere in the sorted list stays in bounds (no clamped slices).
    tokens = jnp.concatenate([tokens, jnp.zeros((rows,), tokens.dtype)])
    comb = jnp.concatenate([comb, jnp.zeros((rows,), comb.dtype)])

    def run(e, gate, up, down, out):
        """Expert ``e`` on its own tokens, ``rows`` at a time, as many slots as its load needs."""
        def slot(s, out):
            first = starts[e] + s * rows
            tok = jax.lax.dynamic_slice_in_dim(tokens, first, rows)
            w = jax.lax.dynamic_slice_in_dim(comb, first, rows)
            w = jnp.where(s * rows + jnp.arange(rows) < counts[e], w, 0.0)
            h = clamped_swiglu(y[tok], gate, up, down, limit)
            return out.at[tok].add(h.astype(jnp.float32) * w[:, None])

        return jax.lax.fori_loop(0, (counts[e] + rows - 1) // rows, slot, out)

    # Visit only the experts some token chose: their ids first (stable), then a loop whose trip
    # count is how many there are. Unused experts cost nothing — not even a skipped branch.
    used = counts > 0
    order = jnp.argsort(~used, stable=True).astype(jnp.int32)
    if per_expert:  # one switch branch per expert; its matmuls read that expert's own buffers
        branches = [functools.partial(run, e, p.gate[e], p.up[e], p.down[e])
                    for e in range(num_experts)]
        visit = lambda e, out: jax.lax.switch(e, branches, out)  # noqa: E731
    else:  # stacked: XLA:CPU copies the chosen expert's slice before the matmuls read it
        def visit(e, out):
            def pick(w):
                one = lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False)  # noqa: E731
                if isinstance(w, Fp8Weight):
                    return Fp8Weight(one(w.values), one(w.scales), w.view[1:])
                return one(w)

            return run(e, pick(p.gate), pick(p.up), pick(p.down), out)

    out = jax.lax.fori_loop(0, jnp.sum(used), lambda j, out: visit(order[j], out),
                            jnp.zeros(y.shape, jnp.float32))
    return out.astype(y.dtype)


# Grouped matmul of expert-sorted rows ``[M, in]`` with stacked ``[G, out, in]`` weights.
_RAGGED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0])


def _grouped(x, w, counts):
    return jax.lax.ragged_dot_general(x, w, counts, _RAGGED_DIMS)


def _experts_ragged(y, weights, idx, p: Moe, cfg: Step3Config, limit: float) -> jax.Array:
    gate, up, down = (materialize(stack_weight(w) if isinstance(w, (tuple, list)) else w, y.dtype)
                      for w in (p.gate, p.up, p.down))
    tokens, comb, counts = _sort_by_expert(weights, idx, gate.shape[0])
    x = y[tokens]
    h = _activate(_grouped(x, gate, counts), _grouped(x, up, counts), limit)
    o = _grouped(h, down, counts)
    out = jnp.zeros(y.shape, jnp.float32).at[tokens].add(o.astype(jnp.float32) * comb[:, None])
    return out.astype(y.dtype)


def block_rows(num_pairs: int, num_experts: int) -> int:
    """Rows per block of the blocks kernel (static): the mean expert load rounded up to a power
    of two, between 8 and 256 (256 measured best for training batches on XLA:CPU)."""
    mean_load = max(1, -(-num_pairs // num_experts))
    return min(256, max(8, 1 << (mean_load - 1).bit_length()))


def _experts_blocks(y, weights, idx, p: Moe, cfg: Step3Config, limit: float) -> jax.Array:
    gate, up, down = (materialize(stack_weight(w) if isinstance(w, (tuple, list)) else w, y.dtype)
                      for w in (p.gate, p.up, p.down))
    num_experts = gate.shape[0]
    n, k = idx.shape
    rows = block_rows(n * k, num_experts)
    num_blocks = -(-n * k // rows) + num_experts  # sum_e ceil(count_e / rows) never exceeds it
    flat = idx.reshape(-1)
    # Under expert parallelism, pairs of non-local experts carry the sink index ``num_experts``:
    # they sort last, are counted nowhere and are written past the end (dropped).
    order = jnp.argsort(flat, stable=True)
    expert = flat[order]
    local = expert < num_experts
    tokens = (jnp.arange(n * k, dtype=jnp.int32) // k)[order]
    counts = jnp.bincount(jnp.where(local, expert, num_experts),
                          length=num_experts + 1)[:num_experts].astype(jnp.int32)
    padded = -(-counts // rows) * rows
    padded_end = jnp.cumsum(padded)
    e = jnp.minimum(expert, num_experts - 1)
    rank = jnp.arange(n * k, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[e]
    dest = jnp.where(local, padded_end[e] - padded[e] + rank, num_blocks * rows)
    block_tok = jnp.zeros((num_blocks * rows,), jnp.int32).at[dest].set(tokens, mode="drop")
    block_w = jnp.zeros((num_blocks * rows,), jnp.float32).at[dest].set(
        weights.reshape(-1)[order].astype(jnp.float32), mode="drop")
    # Block b belongs to the expert whose padded range contains row b*rows; blocks past the
    # last expert's range hold only zero-weight rows.
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(num_blocks) * rows, side="right"),
        num_experts - 1)

    def block(_, xs):
        x, e = xs
        pick = lambda w: jax.lax.dynamic_index_in_dim(w, e, keepdims=False)  # noqa: E731
        return None, clamped_swiglu(x, pick(gate), pick(up), pick(down), limit)

    x = y[block_tok].reshape(num_blocks, rows, y.shape[-1])
    _, o = jax.lax.scan(block, None, (x, block_expert))
    o = o.reshape(num_blocks * rows, -1).astype(jnp.float32) * block_w[:, None]
    return jnp.zeros(y.shape, jnp.float32).at[block_tok].add(o).astype(y.dtype)


def resolve_impl(cfg: Step3Config) -> str:
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    return "loop" if jax.default_backend() == "cpu" else "ragged"


# The per-expert layout makes the loop kernel a ``switch`` with a branch per expert, and XLA:CPU's
# compile time grows steeply with the branches: one Step-3.5 MoE layer of 288 experts (the
# step35-bench preset cut to 2 layers, batch-1 decode) compiled in 198 s per-expert against 4.9 s
# stacked, and stepped at the same speed (21.1 against 21.6 ms on the loaded machine;
# tools/bench_step35.py). Above this many experts the loop kernel reads the stacked array.
PER_EXPERT_MAX_EXPERTS = 64


def per_expert_layout(cfg: Step3Config, expert_parallel: int = 1) -> bool:
    """Whether ``cfg``'s kernel wants each expert's weights as separate arrays — the one place
    the runtime layout of the experts is decided (loading, AFD placement and the memory plan ask
    here). The XLA:CPU ``loop`` kernel does: it reads them in place, where a slice of the stacked
    array would be copied (``weights.unstack_experts``), unless there are more than
    :data:`PER_EXPERT_MAX_EXPERTS` experts (compile time, above). ``ragged_dot`` and ``blocks``
    want the stacked experts, and so does expert parallelism (``ep > 1``), which splits the
    stacked expert axis over devices."""
    return (resolve_impl(cfg) == "loop" and expert_parallel == 1
            and cfg.moe_num_experts <= PER_EXPERT_MAX_EXPERTS)


def routed_experts(y: jax.Array, weights: jax.Array, idx: jax.Array, p: Moe,
                   cfg: Step3Config, limit: float = 0.0) -> jax.Array:
    """``sum_j weights[:, j] * Expert[idx[:, j]](y)`` for ``y [N, H]``, on the backend's kernel.

    ``p``: any record with the experts' ``gate``/``up``/``down`` (Step-3's ``Moe``, Step-3.5's
    ``Moe35``), stacked ``[E, ...]`` or per expert; ``limit``: the experts' SwiGLU clamp (0:
    none, a static float)."""
    impl = {"loop": _experts_loop, "ragged": _experts_ragged,
            "blocks": _experts_blocks}[resolve_impl(cfg)]
    return impl(y, weights, idx, p, cfg, limit)


def _parallel_axes(mesh) -> tuple[str, ...]:
    """The mesh axes the experts are split over (``ep`` by expert, ``tp`` within each)."""
    if mesh is None or mesh.empty:
        return ()
    return tuple(a for a in ("ep", "tp") if a in mesh.shape and mesh.shape[a] > 1)


def expert_parallel(y, weights, idx, p: Moe, cfg: Step3Config, mesh,
                    limit: float = 0.0) -> jax.Array:
    """Routed experts under expert/tensor parallelism, inside ``jax.shard_map``.

    ``y [B, T, H]`` and the routing ``[B, T, k]`` are split by batch over ``dp`` and replicated
    over ``ep``/``tp``; each device holds ``E/ep`` experts, each split over ``tp`` along its
    width. A device runs the backend's kernel on its local experts only — token-expert pairs
    whose expert lives elsewhere go to a sink index the kernel never visits — and the partial
    outputs are summed with one ``psum`` over ``ep`` and ``tp``. Only collectives XLA:CPU
    implements are used (no ``ragged_all_to_all``).
    """
    from jax.sharding import PartitionSpec as P

    axes = _parallel_axes(mesh)
    ep = mesh.shape.get("ep", 1)
    ndp = mesh.shape.get("dp", 1)
    dp = "dp" if ndp > 1 and y.shape[0] % ndp == 0 else None  # else every dp group computes all
    tp = "tp" if mesh.shape.get("tp", 1) > 1 else None
    epa = "ep" if ep > 1 else None
    def spec(w, *axes):
        """The in_spec of one weight; an FP8 weight's scales split like its values (the block
        grid must then divide evenly, which ``quant.scale_sharding`` guarantees at load)."""
        if not isinstance(w, Fp8Weight):
            return P(*axes)
        sizes = [1 if a is None else mesh.shape[a] for a in axes]
        for dim, (size, n) in enumerate(zip(w.values.shape, sizes)):
            if n > 1 and (size % n or (size // n) % BLOCK) and dim >= len(sizes) - 2:
                raise ConfigError(f"FP8 expert weights of shape {list(w.values.shape)}: axis "
                                  f"{dim} does not split into whole {BLOCK}-blocks over {n} "
                                  "devices; use a smaller tp or a dequantized checkpoint")
        return Fp8Weight(P(*axes), P(*axes), w.view)

    if isinstance(p.gate, (tuple, list)):  # per-expert layout (ep == 1): each split over tp
        w_specs = (tuple(spec(w, tp, None) for w in p.gate),
                   tuple(spec(w, tp, None) for w in p.up),
                   tuple(spec(w, None, tp) for w in p.down))
    else:  # gate/up [E, Fe, H], down [E, H, Fe]
        w_specs = (spec(p.gate, epa, tp, None), spec(p.up, epa, tp, None),
                   spec(p.down, epa, None, tp))
    local_experts = cfg.moe_num_experts // ep

    def local_view(w):
        """Inside the shard_map an FP8 expert weight's matrix view is its local shape."""
        if isinstance(w, (tuple, list)):
            return tuple(local_view(x) for x in w)
        return Fp8Weight(w.values, w.scales, tuple(w.values.shape)) if isinstance(
            w, Fp8Weight) else w

    def body(y, weights, idx, gate, up, down):
        gate, up, down = local_view(gate), local_view(up), local_view(down)
        first = jax.lax.axis_index("ep") * local_experts if ep > 1 else 0
        local = idx - first
        local = jnp.where((local >= 0) & (local < local_experts), local, local_experts)
        shape = y.shape
        local_p = Moe(router=None, gate=gate, up=up, down=down, shared=None)
        out = routed_experts(y.reshape(-1, shape[-1]), weights.reshape(-1, idx.shape[-1]),
                             local.reshape(-1, idx.shape[-1]), local_p, cfg, limit)
        return jax.lax.psum(out, axes).reshape(shape)

    batch = P(dp)
    return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, batch, *w_specs),
                         out_specs=batch, check_vma=False)(y, weights, idx, p.gate, p.up, p.down)


def experts(y: jax.Array, weights: jax.Array, idx: jax.Array, p: Moe, cfg: Step3Config,
            limit: float = 0.0) -> jax.Array:
    """The routed experts of one layer on ``y [..., H]`` with routing ``weights``/``idx
    [..., k]``: under a mesh (``jax.set_mesh``) with ``ep`` or ``tp`` larger than 1 through
    :func:`expert_parallel` (``y`` then ``[B, T, H]``), otherwise on one device's kernel."""
    mesh = jax.sharding.get_abstract_mesh()
    with jax.named_scope("moe_experts"):
        if _parallel_axes(mesh):
            return expert_parallel(y, weights, idx, p, cfg, mesh, limit)
        flat = y.reshape(-1, y.shape[-1])
        return routed_experts(flat, weights.reshape(-1, idx.shape[-1]),
                              idx.reshape(-1, idx.shape[-1]), p, cfg, limit).reshape(y.shape)


def moe(p: Moe, y: jax.Array, cfg: Step3Config, routing=None) -> jax.Array:
    """The MoE FFN of one layer on ``y [B, T, H]``: routed experts plus the shared expert.

    ``routing``: ``(weights, idx)`` computed elsewhere (AFD routes on the attention side);
    default: route here with ``p.router``. The routed experts run through :func:`experts`.
    """
    if routing is None:
        with jax.named_scope("moe_router"):
            routing = route(y, p.router, cfg)
    out = experts(y, *routing, p, cfg)
    with jax.named_scope("shared_expert"):
        out = out + swiglu(y, p.shared.gate, p.shared.up, p.shared.down)
    return out
