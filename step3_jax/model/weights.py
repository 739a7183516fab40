"""Every weight declared once: shape, logical axes, initializer and its Hub tensor name.

:func:`declare` returns the parameter pytree with a :class:`WeightSpec` at each leaf. Everything
else is derived from it: seeded random init (:func:`init_params`), abstract shapes for restore
targets (:func:`abstract_params`), shardings (``sharding.param_shardings``), parameter counts
(:func:`count_params`) and the Hub checkpoint mapping (``checkpoint/hub.py``).

Layout. Every matmul weight keeps the Hub (torch) layout ``[out, in]`` and a layer is
``x @ w.T`` (``layers.linear``): on XLA:CPU a decode-sized matmul reads an ``[out, in]`` weight
up to 1.35x (batch 1) and 2.8x (batch 16) faster than the same weight stored ``[in, out]``
(BENCHMARKS.md, "Weight layout"). Head-structured weights keep their head axis (``wq: [heads, d, Q]``,
``o_proj: [H, heads, d]``) so tensor parallelism splits heads by name; the Hub tensor becomes the
declared weight by a reshape alone. Each decoder layer owns its
arrays (``Params.layers`` is a tuple of :class:`Layer`): stacking layers along a leading axis and
scanning would make XLA:CPU copy every layer's slice — all 48 experts of an MoE layer — before
each matmul (measured 3x slower on dense matvecs, far worse on the MoE; see BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from step3_jax.model.config import Step3Config
from step3_jax.model.quant import Fp8Weight


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight: its (padded) shape, logical axes, initializer and where it lives on the Hub.

    ``hub`` is the Hub tensor name and ``hub_shape`` its shape there. The Hub tensor becomes this
    weight by reshaping to the per-layer shape and zero-padding the ``vocab`` axis
    (:func:`hub_to_leaf` / :func:`leaf_to_hub`).
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal" (std = scale / sqrt(fan_in)) or "ones"
    hub: str
    hub_shape: tuple[int, ...]  # one layer's tensor as stored on the Hub (torch layout)
    fan_in: int = 1
    scale: float = 1.0


# ----- the parameter pytree -----------------------------------------------------------------------

@struct.dataclass
class Attention:
    q_proj: jax.Array      # [Q, H]         low-rank query
    k_proj: jax.Array      # [d, H]         the one shared K head
    v_proj: jax.Array      # [d, H]         the one shared V head
    inter_norm: jax.Array  # [Q]            RMSNorm over the whole low-rank query
    wq: jax.Array          # [n, d, Q]      expansion to n heads
    o_proj: jax.Array      # [H, n, d]


@struct.dataclass
class Mlp:
    gate: jax.Array  # [F, H]
    up: jax.Array    # [F, H]
    down: jax.Array  # [H, F]


@struct.dataclass
class Moe:
    """Routed experts plus the shared expert.

    Expert weights are declared stacked (``[E, ...]``, the canonical layout: Hub mapping,
    shardings, counts). The XLA:CPU loop kernel runs on the *per-expert* layout instead — a tuple
    of ``E`` separate arrays (:func:`unstack_experts`) — because XLA:CPU copies any slice of a
    stacked array before a matmul reads it.
    """

    router: jax.Array  # [E, H]
    gate: jax.Array    # [E, Fe, H]  (or a tuple of E [Fe, H] arrays)
    up: jax.Array      # [E, Fe, H]  (or a tuple of E [Fe, H] arrays)
    down: jax.Array    # [E, H, Fe]  (or a tuple of E [H, Fe] arrays)
    shared: Mlp        # the always-on shared expert, width share_expert_dim


@struct.dataclass
class Layer:
    """One decoder layer: MFA, then the MoE (``moe_layers``) or the dense SwiGLU."""

    input_norm: jax.Array  # [H]
    post_norm: jax.Array   # [H]
    attn: Attention
    ffn: Mlp | Moe


@struct.dataclass
class Params:
    embed: jax.Array           # [V_pad, H]
    layers: tuple[Layer, ...]  # num_hidden_layers of them
    final_norm: jax.Array      # [H]
    lm_head: jax.Array | None  # [V_pad, H]; None when tie_word_embeddings


# ----- the declaration ------------------------------------------------------------------------------

def _mlp(hidden: int, width: int, axis: str, prefix: str) -> Mlp:
    return Mlp(
        gate=WeightSpec((width, hidden), (axis, "embed"), "normal",
                        f"{prefix}.gate_proj.weight", (width, hidden), fan_in=hidden),
        up=WeightSpec((width, hidden), (axis, "embed"), "normal",
                      f"{prefix}.up_proj.weight", (width, hidden), fan_in=hidden),
        down=WeightSpec((hidden, width), ("embed", axis), "normal",
                        f"{prefix}.down_proj.weight", (hidden, width), fan_in=width),
    )


def _layer(cfg: Step3Config, i: int) -> Layer:
    H, Q, nh, d = cfg.hidden_size, cfg.share_q_dim, cfg.num_attention_heads, cfg.head_dim
    lay = f"model.layers.{i}"
    attn = Attention(
        q_proj=WeightSpec((Q, H), ("q_lora", "embed"), "normal",
                          f"{lay}.self_attn.q_proj.weight", (Q, H), fan_in=H),
        k_proj=WeightSpec((d, H), ("head_dim", "embed"), "normal",
                          f"{lay}.self_attn.k_proj.weight", (d, H), fan_in=H),
        v_proj=WeightSpec((d, H), ("head_dim", "embed"), "normal",
                          f"{lay}.self_attn.v_proj.weight", (d, H), fan_in=H),
        inter_norm=WeightSpec((Q,), ("q_lora",), "ones",
                              f"{lay}.self_attn.inter_norm.weight", (Q,)),
        wq=WeightSpec((nh, d, Q), ("heads", "head_dim", "q_lora"), "normal",
                      f"{lay}.self_attn.wq.weight", (nh * d, Q), fan_in=Q),
        o_proj=WeightSpec((H, nh, d), ("embed", "heads", "head_dim"), "normal",
                          f"{lay}.self_attn.o_proj.weight", (H, nh * d), fan_in=nh * d),
    )
    if cfg.is_moe(i):
        E, Fe = cfg.moe_num_experts, cfg.moe_intermediate_size
        ffn = Moe(
            router=WeightSpec((E, H), ("experts", "embed"), "normal",
                              f"{lay}.moe.gate.weight", (E, H), fan_in=H, scale=2.0),
            gate=WeightSpec((E, Fe, H), ("experts", "expert_mlp", "embed"),
                            "normal", f"{lay}.moe.gate_proj.weight", (E, Fe, H), fan_in=H),
            up=WeightSpec((E, Fe, H), ("experts", "expert_mlp", "embed"),
                          "normal", f"{lay}.moe.up_proj.weight", (E, Fe, H), fan_in=H),
            down=WeightSpec((E, H, Fe), ("experts", "embed", "expert_mlp"),
                            "normal", f"{lay}.moe.down_proj.weight", (E, H, Fe), fan_in=Fe),
            shared=_mlp(H, cfg.share_expert_dim, "shared_mlp", f"{lay}.share_expert"),
        )
    else:
        ffn = _mlp(H, cfg.intermediate_size, "mlp", f"{lay}.mlp")
    return Layer(
        input_norm=WeightSpec((H,), ("embed",), "ones",
                              f"{lay}.input_layernorm.weight", (H,)),
        post_norm=WeightSpec((H,), ("embed",), "ones",
                             f"{lay}.post_attention_layernorm.weight", (H,)),
        attn=attn,
        ffn=ffn,
    )


def hub_to_leaf(arr: np.ndarray, spec: WeightSpec, cfg) -> np.ndarray:
    """A Hub tensor -> the weight ``spec`` declares (reshape, pad the vocabulary); either
    family's declaration (``cfg.vocab_size``)."""
    unpadded = tuple(cfg.vocab_size if a == "vocab" else n for a, n in zip(spec.axes, spec.shape))
    arr = arr.reshape(unpadded)
    if unpadded != spec.shape:
        arr = np.pad(arr, [(0, full - have) for full, have in zip(spec.shape, unpadded)])
    return arr


def leaf_to_hub(arr: np.ndarray, spec: WeightSpec, cfg) -> np.ndarray:
    """Inverse of :func:`hub_to_leaf`."""
    arr = arr[tuple(slice(0, cfg.vocab_size) if a == "vocab" else slice(None) for a in spec.axes)]
    return np.ascontiguousarray(arr.reshape(spec.hub_shape))


def declare(cfg: Step3Config) -> Params:
    """The parameter pytree of ``cfg`` with a :class:`WeightSpec` at every leaf."""
    H, V = cfg.hidden_size, cfg.padded_vocab
    return Params(
        embed=WeightSpec((V, H), ("vocab", "embed"), "normal", "model.embed_tokens.weight",
                         (cfg.vocab_size, H)),
        layers=tuple(_layer(cfg, i) for i in range(cfg.num_hidden_layers)),
        final_norm=WeightSpec((H,), ("embed",), "ones", "model.norm.weight", (H,)),
        lm_head=None if cfg.tie_word_embeddings else WeightSpec(
            (V, H), ("vocab", "embed"), "normal", "lm_head.weight", (cfg.vocab_size, H),
            fan_in=H),
    )


def is_spec(x) -> bool:
    return isinstance(x, WeightSpec)


def map_specs(fn: Callable[[WeightSpec], object], tree) -> Params:
    return jax.tree.map(fn, tree, is_leaf=is_spec)


# ----- everything derived from it -----------------------------------------------------------------

def abstract_params(cfg: Step3Config, shardings=None) -> Params:
    """``jax.ShapeDtypeStruct`` leaves: restore targets and inputs to ``jit(...).lower``."""
    dtype = jnp.dtype(cfg.dtype)
    decl = declare(cfg)
    if shardings is None:
        return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), decl)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                        decl, shardings, is_leaf=is_spec)


def _init_leaf(spec: WeightSpec, key: jax.Array, cfg: Step3Config) -> jax.Array:
    dtype = jnp.dtype(cfg.dtype)
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    std = spec.scale / math.sqrt(spec.fan_in)
    w = std * jax.random.normal(key, spec.shape, jnp.float32)
    if "vocab" in spec.axes:  # the padding rows/columns of the vocabulary stay zero
        axis = spec.axes.index("vocab")
        keep = jnp.arange(spec.shape[axis]) < cfg.vocab_size
        w = jnp.where(keep.reshape([-1 if a == axis else 1 for a in range(w.ndim)]), w, 0.0)
    return w.astype(dtype)


def init_params(cfg: Step3Config, seed: int = 0, shardings=None, keep=None) -> Params:
    """Seeded random weights, created directly with their shardings (never whole on one device).

    Leaf ``j`` (in pytree order) draws from ``fold_in(PRNGKey(seed), j)``, so a weight's values
    do not depend on how the model is sharded. ``keep``: a params-shaped tree of bools; leaves
    marked False are not created and come back as None (one process of a multi-process AFD run
    makes only its own part, with the values the whole model would have).
    """
    decl = declare(cfg)
    leaves, treedef = jax.tree.flatten(decl, is_leaf=is_spec)
    kept = tuple(range(len(leaves))) if keep is None else tuple(
        j for j, k in enumerate(treedef.flatten_up_to(keep)) if k)
    flat_sh = None if shardings is None else tuple(treedef.flatten_up_to(shardings)[j]
                                                   for j in kept)
    made = dict(zip(kept, _init_program(cfg, kept, flat_sh)(jax.random.PRNGKey(seed))))
    return treedef.unflatten([made.get(j) for j in range(len(leaves))])


@functools.lru_cache(maxsize=16)
def _init_program(cfg: Step3Config, kept: tuple[int, ...], shardings: tuple | None):
    """The jitted initializer of leaves ``kept`` (on ``shardings``), kept per config and
    placement: its compilation (~9 s for the tiny preset on a 2-core CPU) is paid once per
    process, not per call (the CLI and the tests build many models of one config)."""
    leaves = jax.tree.leaves(declare(cfg), is_leaf=is_spec)

    def make(key):
        return [_init_leaf(leaves[j], jax.random.fold_in(key, j), cfg) for j in kept]

    return jax.jit(make, out_shardings=None if shardings is None else list(shardings))


def count_params(cfg: Step3Config) -> dict[str, int]:
    """Total and per-token-activated parameter counts, from the declaration.

    The vocabulary counts at its real size (padding excluded). Activated follows the paper's
    convention: the input embedding is left out, and routed experts count ``top_k / experts``.
    """
    total = activated = 0
    for spec in jax.tree.leaves(declare(cfg), is_leaf=is_spec):
        size = math.prod(cfg.vocab_size if a == "vocab" else n
                         for a, n in zip(spec.axes, spec.shape))
        total += size
        if spec.hub == "model.embed_tokens.weight":
            continue
        if "expert_mlp" in spec.axes:  # routed expert FFNs (the router has no expert_mlp axis)
            activated += size * cfg.moe_top_k // cfg.moe_num_experts
        else:
            activated += size
    return {"total": total, "activated": activated}


def _map_experts(params: Params, fn) -> Params:
    layers = tuple(
        layer.replace(ffn=layer.ffn.replace(gate=fn(layer.ffn.gate), up=fn(layer.ffn.up),
                                            down=fn(layer.ffn.down)))
        if isinstance(layer.ffn, Moe) else layer
        for layer in params.layers)
    return params.replace(layers=layers)


def _unstack(w):
    if w is None or isinstance(w, tuple):  # None: a weight this process does not hold
        return w
    return tuple(w[e] for e in range(w.shape[0]))


def unstack_moe(p: Moe) -> Moe:
    """One MoE layer in the per-expert layout."""
    return p.replace(gate=_unstack(p.gate), up=_unstack(p.up), down=_unstack(p.down))


def stack_moe(p: Moe) -> Moe:
    """One MoE layer in the canonical stacked layout (inverse of :func:`unstack_moe`)."""
    return p.replace(gate=stack_weight(p.gate), up=stack_weight(p.up), down=stack_weight(p.down))


def unstack_experts(params: Params) -> Params:
    """The per-expert layout: every stacked ``[E, ...]`` expert weight becomes E arrays."""
    return _map_experts(params, _unstack)


def stack_weight(w):
    """One expert weight's per-expert tuple as the stacked ``[E, ...]`` array (or FP8 node)."""
    if not isinstance(w, tuple):
        return w
    if isinstance(w[0], Fp8Weight):
        return Fp8Weight(jnp.stack([x.values for x in w]), jnp.stack([x.scales for x in w]),
                         (len(w),) + w[0].view)
    return jnp.stack(w)


def stack_experts(params: Params) -> Params:
    """The canonical layout (inverse of :func:`unstack_experts`; a no-op on stacked params)."""
    return _map_experts(params, stack_weight)
