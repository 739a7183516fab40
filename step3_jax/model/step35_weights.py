"""The Step-3.5 text decoder's weights, declared once (``shared/spec/step35.md`` §3).

:func:`declare` returns the parameter pytree with a :class:`Spec35` at every leaf: its shape,
logical axes, initializer, dtype override and Hub tensor name and shape. Random init
(:func:`init_params`), parameter counts (:func:`count_params`) and the Hub mapping
(:func:`from_hub_state`) derive from it, as :mod:`step3_jax.model.weights` does for Step-3.

Layout follows Step-3's (``weights.py``): matmul weights keep the Hub ``[out, in]`` layout,
head-structured ones keep their head axis (``q_proj [n, d, H]``, ``k_proj``/``v_proj
[G, d, H]``, ``o_proj [H, n, d]``), so a Hub tensor becomes the declared weight by a reshape
(and zero-padding of the vocabulary). Every layer owns its arrays; the query-head count ``n``
differs between full (64 on Flash) and sliding (96) layers, the K/V heads ``G`` do not.

Every norm is zero-centred (``x * (1 + w)``, spec §2): its weight initializes to zeros. The
router's selection bias ``router_bias`` is float32 whatever the model dtype (spec §3, pitfall 8).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from step3_jax.model.step35_config import Step35Config
from step3_jax.model.weights import Mlp, WeightSpec, hub_to_leaf


@dataclasses.dataclass(frozen=True)
class Spec35(WeightSpec):
    """A :class:`~step3_jax.model.weights.WeightSpec` with an optional fixed dtype (None: the
    model's ``cfg.dtype``). ``init``: ``"normal"`` (std = scale / sqrt(fan_in)) or ``"zeros"``."""

    dtype: str | None = None


# ----- the parameter pytree -----------------------------------------------------------------------

@struct.dataclass
class Attention35:
    q_proj: jax.Array  # [n, d, H]
    k_proj: jax.Array  # [G, d, H]
    v_proj: jax.Array  # [G, d, H]
    g_proj: jax.Array  # [n, H]     the per-head sigmoid gate
    q_norm: jax.Array  # [d]        zero-centred, shared by every head
    k_norm: jax.Array  # [d]
    o_proj: jax.Array  # [H, n, d]


@struct.dataclass
class Moe35:
    """Sigmoid-routed experts (stacked ``[E, ...]``) plus the shared expert."""

    router: jax.Array             # [E, H]
    router_bias: jax.Array | None  # [E] float32, chooses only; None without use_moe_router_bias
    gate: jax.Array               # [E, Fe, H]
    up: jax.Array                 # [E, Fe, H]
    down: jax.Array               # [E, H, Fe]
    shared: Mlp | None            # width share_expert_dim; None when it is 0


@struct.dataclass
class Layer35:
    input_norm: jax.Array  # [H]
    post_norm: jax.Array   # [H]
    attn: Attention35
    ffn: Mlp | Moe35


@struct.dataclass
class Params35:
    embed: jax.Array             # [V_pad, H]
    layers: tuple[Layer35, ...]  # num_hidden_layers of them (MTP layers are not part of it)
    final_norm: jax.Array        # [H]
    lm_head: jax.Array | None    # [V_pad, H]; None when tie_word_embeddings


# ----- the declaration ------------------------------------------------------------------------------

def _matrix(shape, axes, hub, hub_shape, fan_in, scale=1.0) -> Spec35:
    return Spec35(tuple(shape), tuple(axes), "normal", hub, tuple(hub_shape), fan_in=fan_in,
                  scale=scale)


def _norm(size: int, axis: str, hub: str) -> Spec35:
    return Spec35((size,), (axis,), "zeros", hub, (size,))


def _mlp(hidden: int, width: int, axis: str, prefix: str) -> Mlp:
    return Mlp(
        gate=_matrix((width, hidden), (axis, "embed"), f"{prefix}.gate_proj.weight",
                     (width, hidden), hidden),
        up=_matrix((width, hidden), (axis, "embed"), f"{prefix}.up_proj.weight",
                   (width, hidden), hidden),
        down=_matrix((hidden, width), ("embed", axis), f"{prefix}.down_proj.weight",
                     (hidden, width), width),
    )


def _layer(cfg: Step35Config, i: int) -> Layer35:
    spec = cfg.layer(i)
    H, n, G, d = cfg.hidden_size, spec.q_heads, spec.kv_heads, spec.head_dim
    lay = f"model.layers.{i}"
    att = f"{lay}.self_attn"
    attn = Attention35(
        q_proj=_matrix((n, d, H), ("heads", "head_dim", "embed"), f"{att}.q_proj.weight",
                       (n * d, H), H),
        k_proj=_matrix((G, d, H), ("kv_heads", "head_dim", "embed"), f"{att}.k_proj.weight",
                       (G * d, H), H),
        v_proj=_matrix((G, d, H), ("kv_heads", "head_dim", "embed"), f"{att}.v_proj.weight",
                       (G * d, H), H),
        g_proj=_matrix((n, H), ("heads", "embed"), f"{att}.g_proj.weight", (n, H), H),
        q_norm=_norm(d, "head_dim", f"{att}.q_norm.weight"),
        k_norm=_norm(d, "head_dim", f"{att}.k_norm.weight"),
        o_proj=_matrix((H, n, d), ("embed", "heads", "head_dim"), f"{att}.o_proj.weight",
                       (H, n * d), n * d),
    )
    if spec.moe:
        E, Fe = cfg.moe_num_experts, cfg.moe_intermediate_size
        ffn = Moe35(
            router=_matrix((E, H), ("experts", "embed"), f"{lay}.moe.gate.weight", (E, H), H,
                           scale=2.0),
            router_bias=Spec35((E,), ("experts",), "zeros", f"{lay}.moe.router_bias", (E,),
                               dtype="float32") if cfg.use_moe_router_bias else None,
            gate=_matrix((E, Fe, H), ("experts", "expert_mlp", "embed"),
                         f"{lay}.moe.gate_proj.weight", (E, Fe, H), H),
            up=_matrix((E, Fe, H), ("experts", "expert_mlp", "embed"),
                       f"{lay}.moe.up_proj.weight", (E, Fe, H), H),
            down=_matrix((E, H, Fe), ("experts", "embed", "expert_mlp"),
                         f"{lay}.moe.down_proj.weight", (E, H, Fe), Fe),
            shared=_mlp(H, cfg.share_expert_dim, "shared_mlp", f"{lay}.share_expert")
            if cfg.share_expert_dim else None,
        )
    else:
        ffn = _mlp(H, cfg.intermediate_size, "mlp", f"{lay}.mlp")
    return Layer35(
        input_norm=_norm(H, "embed", f"{lay}.input_layernorm.weight"),
        post_norm=_norm(H, "embed", f"{lay}.post_attention_layernorm.weight"),
        attn=attn, ffn=ffn)


def declare(cfg: Step35Config) -> Params35:
    """The parameter pytree of ``cfg`` with a :class:`Spec35` at every leaf."""
    H, V = cfg.hidden_size, cfg.padded_vocab
    return Params35(
        embed=_matrix((V, H), ("vocab", "embed"), "model.embed_tokens.weight",
                      (cfg.vocab_size, H), 1),
        layers=tuple(_layer(cfg, i) for i in range(cfg.num_hidden_layers)),
        final_norm=_norm(H, "embed", "model.norm.weight"),
        lm_head=None if cfg.tie_word_embeddings else _matrix(
            (V, H), ("vocab", "embed"), "lm_head.weight", (cfg.vocab_size, H), H),
    )


def is_spec(x) -> bool:
    return isinstance(x, WeightSpec)


def specs(cfg: Step35Config) -> list[Spec35]:
    """Every declared weight, in pytree order."""
    return jax.tree.leaves(declare(cfg), is_leaf=is_spec)


def leaf_dtype(spec: Spec35, cfg: Step35Config):
    return jnp.dtype(spec.dtype or cfg.dtype)


# ----- everything derived from it -----------------------------------------------------------------

def abstract_params(cfg: Step35Config) -> Params35:
    """``jax.ShapeDtypeStruct`` leaves (inputs to ``jit(...).lower``, restore targets)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, leaf_dtype(s, cfg)),
                        declare(cfg), is_leaf=is_spec)


# Random normals come in fixed-size chunks from one compiled program: drawing each leaf's shape
# inside one jit (as ``weights.init_params`` does) compiles an unrolled generator per leaf, ~0.8 s
# each on a 2-core CPU (24 s for 30 leaves); chunks compile once and bound the memory per draw.
_CHUNK = 1 << 18
_normal_chunk = jax.jit(lambda key: jax.random.normal(key, (_CHUNK,), jnp.float32))


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    size = math.prod(shape)
    parts = [_normal_chunk(jax.random.fold_in(key, c)) for c in range(max(1, -(-size // _CHUNK)))]
    return (parts[0] if len(parts) == 1 else jnp.concatenate(parts))[:size].reshape(shape)


def _init_leaf(spec: Spec35, key: jax.Array, cfg: Step35Config) -> jax.Array:
    dtype = leaf_dtype(spec, cfg)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    w = spec.scale / math.sqrt(spec.fan_in) * _normal(key, spec.shape)
    if "vocab" in spec.axes:  # the vocabulary's padding rows stay zero
        axis = spec.axes.index("vocab")
        keep = jnp.arange(spec.shape[axis]) < cfg.vocab_size
        w = jnp.where(keep.reshape([-1 if a == axis else 1 for a in range(w.ndim)]), w, 0.0)
    return w.astype(dtype)


def init_params(cfg: Step35Config, seed: int = 0) -> Params35:
    """Seeded random weights: leaf ``j`` (pytree order) draws from ``fold_in(PRNGKey(seed), j)``
    (in chunks of ``_CHUNK`` normals). Norm weights and the router bias start at zero (a
    zero-centred norm's identity scale)."""
    key = jax.random.PRNGKey(seed)
    return jax.tree.map(lambda s: _init_leaf(s, jax.random.fold_in(key, s.index), cfg),
                        _indexed(cfg), is_leaf=is_spec)


def _indexed(cfg: Step35Config):
    """The declaration with each leaf's pytree index attached (``_Indexed.index``)."""
    decl = declare(cfg)
    leaves, treedef = jax.tree.flatten(decl, is_leaf=is_spec)
    return treedef.unflatten([_Indexed(**dataclasses.asdict(s), index=j)
                              for j, s in enumerate(leaves)])


@dataclasses.dataclass(frozen=True)
class _Indexed(Spec35):
    index: int = 0


def count_params(cfg: Step35Config) -> dict[str, int]:
    """Total and per-token-activated parameter counts from the declaration (vocabulary at its
    real size; activated leaves out the input embedding and counts routed experts at
    ``top_k / experts``, as ``weights.count_params`` does for Step-3). MTP layers not counted."""
    total = activated = 0
    for spec in specs(cfg):
        size = math.prod(cfg.vocab_size if a == "vocab" else n
                         for a, n in zip(spec.axes, spec.shape))
        total += size
        if spec.hub == "model.embed_tokens.weight":
            continue
        if "expert_mlp" in spec.axes:
            activated += size * cfg.moe_top_k // cfg.moe_num_experts
        else:
            activated += size
    return {"total": total, "activated": activated}


def _from_hub(arr, spec: Spec35, cfg: Step35Config) -> np.ndarray:
    """A Hub tensor of an in-memory state -> the declared weight, its shape checked first."""
    arr = np.asarray(arr)
    if tuple(arr.shape) != spec.hub_shape:
        raise ValueError(f"{spec.hub}: Hub shape {list(arr.shape)}, expected "
                         f"{list(spec.hub_shape)}")
    return hub_to_leaf(arr, spec, cfg)


def from_hub_state(state: dict, cfg: Step35Config) -> Params35:
    """Params from an in-memory dict of Hub-named tensors (spec §3 names and shapes). Every
    declared tensor must be present; extra ones (MTP layers ``>= num_hidden_layers``, vision
    tensors) are ignored."""
    decl = declare(cfg)
    missing = [s.hub for s in jax.tree.leaves(decl, is_leaf=is_spec) if s.hub not in state]
    if missing:
        raise KeyError(f"missing Hub tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return jax.tree.map(
        lambda s: jnp.asarray(_from_hub(state[s.hub], s, cfg), leaf_dtype(s, cfg)),
        decl, is_leaf=is_spec)


def stack_experts(params: Params35) -> Params35:
    """The canonical stacked layout: the identity, since Step-3.5's routed experts stay stacked
    ``[E, ...]`` at run time too (the counterpart of ``weights.stack_experts``, which undoes the
    per-expert layout of Step-3's CPU loop kernel), so checkpoint code treats both families alike."""
    return params
