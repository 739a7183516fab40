"""The Step-3.5/3.7-Flash text model's configuration (``shared/spec/step35.md`` §1): a frozen,
hashable dataclass with the layer kinds as data -- per layer its attention kind (full or
sliding window), query heads, RoPE theta, rotary width and scaling, whether its FFN is MoE, and
its clamped-SwiGLU limits -- and the quantities derived from them (the KV positions each layer
keeps). Reading it from a Hub ``config.json`` (both spellings, the ``step3p7`` wrapper, the MTP
padding of per-layer lists) is :mod:`step3_jax.model.step35_reader`.
"""

from __future__ import annotations

import dataclasses

from step3_jax.errors import ConfigError
from step3_jax.model.config import VOCAB_PAD_MULTIPLE, check_numerics

FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling (spec §2 step 3), applied on the layer types it names."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One decoder layer, as the layer code and the analysis need it."""

    index: int
    attention: str           # FULL or SLIDING
    q_heads: int
    kv_heads: int
    head_dim: int
    window: int | None       # SLIDING: positions visible to a query, itself included
    rope_theta: float
    rotary_dim: int          # the leading dims RoPE rotates (0: no RoPE on this layer)
    rope_scaling: RopeScaling | None
    moe: bool
    swiglu_limit: float          # routed experts (0: no clamp)
    swiglu_limit_shared: float   # shared expert / dense FFN (0: no clamp)


@dataclasses.dataclass(frozen=True)
class Step35Config:
    """Step-3.5 text-decoder hyper-parameters (per-layer tuples) plus numerics."""

    hidden_size: int
    num_hidden_layers: int
    head_dim: int
    vocab_size: int
    num_attention_groups: int            # K/V heads, every layer
    layer_types: tuple[str, ...]
    attention_heads: tuple[int, ...]     # query heads per layer
    sliding_window: int | None
    rope_theta: tuple[float, ...]
    partial_rotary_factor: tuple[float, ...]
    use_rope: tuple[bool, ...]
    rope_scaling: tuple[RopeScaling | None, ...]
    intermediate_size: int
    moe_layers: tuple[int, ...]
    moe_num_experts: int
    moe_top_k: int
    moe_intermediate_size: int
    share_expert_dim: int
    moe_router_scaling_factor: float
    swiglu_limits: tuple[float, ...]
    swiglu_limits_shared: tuple[float, ...]
    norm_expert_weight: bool = True
    use_moe_router_bias: bool = True
    num_nextn_predict_layers: int = 0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    moe_impl: str = "auto"
    attention_impl: str = "auto"
    name: str = "step3p5"

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"config {self.name!r}: {msg}")

        L = self.num_hidden_layers
        for key in ("hidden_size", "num_hidden_layers", "head_dim", "vocab_size",
                    "num_attention_groups", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                bad(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("layer_types", "attention_heads", "rope_theta", "partial_rotary_factor",
                    "use_rope", "rope_scaling", "swiglu_limits", "swiglu_limits_shared"):
            if len(getattr(self, key)) != L:
                bad(f"{key} has {len(getattr(self, key))} entries for {L} layers")
        for i, (kind, heads) in enumerate(zip(self.layer_types, self.attention_heads)):
            if kind not in LAYER_TYPES:
                bad(f"layer_types[{i}]={kind!r}: expected {FULL!r} or {SLIDING!r}")
            if heads <= 0 or heads % self.num_attention_groups:
                bad(f"layer {i}: {heads} query heads is not a positive multiple of "
                    f"num_attention_groups={self.num_attention_groups}")
        if SLIDING in self.layer_types and not (self.sliding_window or 0) > 0:
            bad(f"sliding_window must be positive with sliding layers, got {self.sliding_window}")
        for i in range(L):
            r = self.head_dim * self.partial_rotary_factor[i]
            if not 0 < self.partial_rotary_factor[i] <= 1 or r != int(r) or int(r) % 2:
                bad(f"partial_rotary_factors[{i}]={self.partial_rotary_factor[i]} does not give "
                    f"an even number of rotary dims out of head_dim={self.head_dim}")
            if self.rope_theta[i] <= 0:
                bad(f"rope_theta[{i}] must be positive, got {self.rope_theta[i]}")
            if self.swiglu_limits[i] < 0 or self.swiglu_limits_shared[i] < 0:
                bad(f"swiglu_limits[_shared][{i}] must be >= 0 (0: no clamp)")
        if any(not 0 <= i < L for i in self.moe_layers):
            bad(f"the MoE layers name a layer outside 0..{L - 1}: {list(self.moe_layers)}")
        if self.moe_layers:
            if self.moe_num_experts <= 0 or self.moe_intermediate_size <= 0:
                bad("MoE layers need moe_num_experts > 0 and moe_intermediate_size > 0")
            if not 0 < self.moe_top_k <= self.moe_num_experts:
                bad(f"moe_top_k={self.moe_top_k} must be in 1..moe_num_experts="
                    f"{self.moe_num_experts}")
            if self.share_expert_dim < 0 or self.moe_router_scaling_factor <= 0:
                bad("share_expert_dim must be >= 0 and moe_router_scaling_factor > 0")
        if len(self.moe_layers) < L and self.intermediate_size <= 0:
            bad("dense layers need intermediate_size > 0")
        check_numerics(self, bad)

    # ----- derived quantities ---------------------------------------------------------------
    @property
    def max_position_embedding(self) -> int:
        """The context, under the name the runtimes read from either family's config."""
        return self.max_position_embeddings

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer(self, i: int) -> LayerSpec:
        sliding = self.is_sliding(i)
        return LayerSpec(
            index=i, attention=self.layer_types[i], q_heads=self.attention_heads[i],
            kv_heads=self.num_attention_groups, head_dim=self.head_dim,
            window=self.sliding_window if sliding else None, rope_theta=self.rope_theta[i],
            rotary_dim=int(self.head_dim * self.partial_rotary_factor[i]) if self.use_rope[i]
            else 0,
            rope_scaling=self.rope_scaling[i], moe=self.is_moe(i),
            swiglu_limit=self.swiglu_limits[i], swiglu_limit_shared=self.swiglu_limits_shared[i])

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return tuple(self.layer(i) for i in range(self.num_hidden_layers))

    def kv_positions(self, layer: int, context: int) -> int:
        """Positions layer ``layer`` keeps (and a decode step reads) at ``context`` tokens: all
        of them on a full layer, the last ``sliding_window`` (the current one included) on a
        sliding layer (spec §4: a ring of ``window`` slots)."""
        return min(context, self.sliding_window) if self.is_sliding(layer) else context

    def kv_elements(self, context: int) -> int:
        """K and V values one sequence of ``context`` tokens holds over all layers."""
        per_position = 2 * self.num_attention_groups * self.head_dim
        return sum(self.kv_positions(i, context) for i in range(self.num_hidden_layers)) \
            * per_position

    def replace(self, **changes) -> "Step35Config":
        return dataclasses.replace(self, **changes)

    def to_hub_dict(self) -> dict:
        """A bare ``step3p5`` Hub dict (StepFun's spellings, unpadded per-layer lists) that
        ``step35_reader.from_step35_dict`` reads back to this config's architecture."""
        full = next((i for i, t in enumerate(self.layer_types) if t == FULL), None)
        sliding = next((i for i, t in enumerate(self.layer_types) if t == SLIDING), None)
        scaled = [t for t in LAYER_TYPES
                  if any(s is not None for s, k in zip(self.rope_scaling, self.layer_types)
                         if k == t)]
        scaling = next((s for s in self.rope_scaling if s is not None), None)
        eos = list(self.eos_token_ids)
        raw = {
            "_name_or_path": self.name, "model_type": "step3p5",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "num_attention_heads": self.attention_heads[full if full is not None else 0],
            "num_attention_groups": self.num_attention_groups,
            "layer_types": list(self.layer_types), "sliding_window": self.sliding_window,
            "rope_theta": list(self.rope_theta),
            "partial_rotary_factors": list(self.partial_rotary_factor),
            "use_rope_layers": list(self.use_rope),
            "intermediate_size": self.intermediate_size,
            "moe_layers_enum": ",".join(map(str, self.moe_layers)),
            "moe_num_experts": self.moe_num_experts, "moe_top_k": self.moe_top_k,
            "moe_intermediate_size": self.moe_intermediate_size,
            "share_expert_dim": self.share_expert_dim,
            "moe_router_scaling_factor": self.moe_router_scaling_factor,
            "norm_expert_weight": self.norm_expert_weight,
            "use_moe_router_bias": self.use_moe_router_bias,
            "swiglu_limits": list(self.swiglu_limits),
            "swiglu_limits_shared": list(self.swiglu_limits_shared),
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "num_attention_heads_per_layer": list(self.attention_heads),
        }
        if sliding is not None:
            raw["num_sliding_attention_heads"] = self.attention_heads[sliding]
        if scaling is not None:
            raw["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(scaling)}
            raw["yarn_only_types"] = scaled
        return raw
