"""Reading a Step-3.5/3.7-Flash config (``shared/spec/step35.md`` §1) into a
:class:`~step3_jax.model.step35_config.Step35Config`, and loading a config of either family.

Read from a Hub ``config.json`` (``model_type`` ``step3p5``, or the ``text_config`` of a
``step3p7`` wrapper), in StepFun's spellings or the ones transformers' ``Step3p7TextConfig``
renames them to (``num_key_value_heads``, ``n_routed_experts``, ``mlp_layer_types``,
``rope_parameters`` per layer type, ...). Where two spellings of one value are both present they
must agree. Per-layer lists may carry ``num_nextn_predict_layers`` trailing entries for the MTP
layers (the Hub pads them to 48 for 45 layers): those are dropped, MTP is not part of the trunk.

Required beyond the shapes, because the readers' defaults disagree (spec §1): ``layer_types``,
the MoE layers (``moe_layers_enum`` or ``mlp_layer_types``) and ``moe_router_scaling_factor``
(transformers defaults it to 1.0, Step-3.5-Flash uses 3.0). Refused, because no reader implements
them: attention sinks, an ``att_impl_type`` other than GQA, a switched-off head gate, QK norm or
zero-centred norm, a non-sigmoid router, a RoPE scaling other than llama3, and a K/V layout that
differs between layer kinds (spec §4: only the query heads differ).
"""

from __future__ import annotations

from pathlib import Path

from step3_jax.errors import ConfigError
from step3_jax.model.config import (Step3Config, from_hub_dict, read_config_source,
                                    step35_model_type)
from step3_jax.model.step35_config import FULL, LAYER_TYPES, SLIDING, RopeScaling, Step35Config

# ----- reading a Hub dict -------------------------------------------------------------------------

_MISSING = object()
# Flags every reader hard-codes (spec §1): a config that switches one off describes another model.
_FIXED = {"use_head_wise_attn_gate": True, "use_qk_norm": True, "zero_centered": True,
          "sink": False, "att_impl_type": "GQA", "moe_router_activation": "sigmoid"}


class _Reader:
    """Field access on a text config: alias-aware, each error one line naming the field."""

    def __init__(self, text: dict, where: str):
        self.text, self.where = text, where

    def fail(self, msg: str):
        raise ConfigError(f"{self.where}: {msg}")

    def get(self, *names, default=_MISSING):
        """The value under the first present spelling; two present spellings must agree."""
        found = [(n, self.text[n]) for n in names if self.text.get(n) is not None]
        if any(v != found[0][1] for _, v in found[1:]):
            self.fail(" and ".join(f"{n}={v!r}" for n, v in found) + " disagree")
        if found:
            return found[0][1]
        if default is _MISSING:
            also = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
            self.fail(f"missing required key {names[0]}{also}")
        return default

    def number(self, *names, default=_MISSING, kind=int):
        value = self.get(*names, default=default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (kind is int and value != int(value)):
            self.fail(f"{names[0]} must be {'an integer' if kind is int else 'a number'}, "
                      f"got {value!r}")
        return kind(value)

    def per_layer(self, name: str, values, layers: int, padded: int) -> list:
        """A per-layer list, its MTP padding dropped; a scalar applies to every layer."""
        if not isinstance(values, list):
            return [values] * layers
        if len(values) not in (layers, padded):
            self.fail(f"{name} has {len(values)} entries: expected {layers} (num_hidden_layers)"
                      + (f" or {padded} (+ num_nextn_predict_layers)" if padded != layers else ""))
        return values[:layers]


def _moe_layers(r: _Reader, layers: int, padded: int, experts: int) -> tuple[int, ...]:
    enum = r.get("moe_layers_enum", default=None)
    types = r.get("mlp_layer_types", default=None)
    if enum is None and types is None:
        if experts:
            r.fail(f"missing required key moe_layers_enum (or mlp_layer_types): {experts} "
                   "experts configured and the readers' defaults disagree (spec §1)")
        return ()
    found = set()
    if enum is not None:
        try:
            items = enum.split(",") if isinstance(enum, str) else list(enum)
            found = {int(str(x).strip()) for x in items if str(x).strip()}
        except (TypeError, ValueError):
            r.fail(f"moe_layers_enum must be a comma-separated string or a list of layer "
                   f"indices, got {enum!r}")
        if any(not 0 <= i < padded for i in found):
            r.fail(f"moe_layers_enum names a layer outside 0..{padded - 1}: {sorted(found)}")
        found = {i for i in found if i < layers}  # MTP layers are not part of the trunk
    if types is not None:
        kinds = r.per_layer("mlp_layer_types", types, layers, padded)
        if any(k not in ("dense", "sparse") for k in kinds):
            r.fail(f"mlp_layer_types entries must be 'dense' or 'sparse', got {kinds!r}")
        from_types = {i for i, k in enumerate(kinds) if k == "sparse"}
        if enum is not None and from_types != found:
            r.fail("moe_layers_enum and mlp_layer_types name different MoE layers")
        found = from_types
    return tuple(sorted(found))


def _rope_scaling(r: _Reader, value, what: str) -> RopeScaling | None:
    if not value:
        return None
    if not isinstance(value, dict):
        r.fail(f"{what} must be a JSON object, got {value!r}")
    kind = value.get("rope_type", value.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        r.fail(f"{what}: rope_type {kind!r} is not supported (Step-3.5-Flash uses llama3)")
    try:
        return RopeScaling(float(value["factor"]), float(value["low_freq_factor"]),
                           float(value["high_freq_factor"]),
                           int(value["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        r.fail(f"{what}: llama3 scaling needs factor, low_freq_factor, high_freq_factor and "
               f"original_max_position_embeddings ({e.__class__.__name__}: {e})")


def from_step35_dict(raw: dict, *, where: str = "config.json", **overrides) -> Step35Config:
    """A :class:`Step35Config` from a Hub dict: bare ``step3p5`` or a ``step3p7`` wrapper."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    text = raw.get("text_config", raw)
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: text_config must be a JSON object")
    r = _Reader(text, where)
    for key, expected in _FIXED.items():
        if text.get(key) is not None and text[key] != expected:
            r.fail(f"{key}={text[key]!r} is not supported: every Step-3.5 reader assumes "
                   f"{expected!r}")
    layers = r.number("num_hidden_layers")
    nextn = r.number("num_nextn_predict_layers", "num_mtp_layers", default=0)
    padded = layers + nextn
    head_dim, kv = r.number("head_dim"), r.number("num_attention_groups", "num_key_value_heads")
    full_heads = r.number("num_attention_heads")
    kinds = r.get("layer_types")
    if not isinstance(kinds, list):
        r.fail(f"layer_types must be a list of {FULL!r}/{SLIDING!r}, got {kinds!r}")
    kinds = r.per_layer("layer_types", kinds, layers, padded)
    other = r.get("attention_other_setting", default=None) or {}
    if not isinstance(other, dict):
        r.fail(f"attention_other_setting must be a JSON object, got {other!r}")
    for key, value in (("num_attention_groups", kv), ("head_dim", head_dim)):
        if other.get(key, value) != value:
            r.fail(f"attention_other_setting.{key}={other[key]} differs from {key}={value}: one "
                   "K/V layout on every layer is assumed (spec §4)")
    sliding_heads = r.number("num_sliding_attention_heads", default=None)
    if sliding_heads is None:
        sliding_heads = int(other.get("num_attention_heads", full_heads))
    elif other.get("num_attention_heads", sliding_heads) != sliding_heads:
        r.fail(f"num_sliding_attention_heads={sliding_heads} and attention_other_setting."
               f"num_attention_heads={other['num_attention_heads']} disagree")
    heads = [sliding_heads if k == SLIDING else full_heads for k in kinds]
    per_layer_heads = r.get("num_attention_heads_per_layer", default=None)
    if per_layer_heads is not None and \
            r.per_layer("num_attention_heads_per_layer", per_layer_heads, layers, padded) != heads:
        r.fail("num_attention_heads_per_layer disagrees with layer_types and the per-kind "
               f"head counts ({full_heads} full, {sliding_heads} sliding)")

    # RoPE: StepFun's per-layer lists, or transformers' rope_parameters keyed by layer type.
    by_type = r.get("rope_parameters", default=None) or {}
    if isinstance(by_type, dict) and "rope_theta" in by_type:  # one block for every type
        by_type = {t: by_type for t in LAYER_TYPES}
    if not isinstance(by_type, dict) or not all(isinstance(v, dict) for v in by_type.values()):
        r.fail(f"rope_parameters must map layer types to JSON objects, got {by_type!r}")
    hub_theta, hub_partial = r.get("rope_theta", default=None), \
        r.get("partial_rotary_factors", default=None)
    thetas = r.per_layer("rope_theta", hub_theta, layers, padded) if hub_theta is not None \
        else [by_type.get(k, {}).get("rope_theta") for k in kinds]
    partials = r.per_layer("partial_rotary_factors", hub_partial, layers, padded) \
        if hub_partial is not None else [by_type.get(k, {}).get("partial_rotary_factor", 1.0)
                                         for k in kinds]
    for i, k in enumerate(kinds):
        block = by_type.get(k, {})
        for name, ours in (("rope_theta", thetas[i]), ("partial_rotary_factor", partials[i])):
            if ours is None:
                r.fail(f"missing rope_theta for layer {i} ({k}): give rope_theta or "
                       f"rope_parameters.{k}.rope_theta")
            if block.get(name) is not None and float(block[name]) != float(ours):
                r.fail(f"rope_parameters.{k}.{name}={block[name]} disagrees with layer {i}'s "
                       f"{ours}")
    hub_scaling = _rope_scaling(r, r.get("rope_scaling", default=None), "rope_scaling")
    scaled_types = r.get("yarn_only_types", default=[FULL])
    scaling = [hub_scaling if k in scaled_types else None for k in kinds] \
        if hub_scaling is not None else \
        [_rope_scaling(r, by_type.get(k), f"rope_parameters.{k}") for k in kinds]
    use_rope = r.get("use_rope_layers", default=None) or [True] * layers

    experts = r.number("moe_num_experts", "n_routed_experts", "num_local_experts", default=0)
    moe_layers = _moe_layers(r, layers, padded, experts)
    limits = [[float(v or 0) for v in
               r.per_layer(name, r.get(name, default=None) or [0] * layers, layers, padded)]
              for name in ("swiglu_limits", "swiglu_limits_shared")]
    eos = r.get("eos_token_id", default=raw.get("eos_token_id"))
    bos = r.get("bos_token_id", default=raw.get("bos_token_id"))
    fields = dict(
        hidden_size=r.number("hidden_size"), num_hidden_layers=layers, head_dim=head_dim,
        vocab_size=r.number("vocab_size"), num_attention_groups=kv, layer_types=tuple(kinds),
        attention_heads=tuple(heads),
        sliding_window=r.number("sliding_window") if SLIDING in kinds else None,
        rope_theta=tuple(float(t) for t in thetas),
        partial_rotary_factor=tuple(float(p) for p in partials),
        use_rope=tuple(bool(u) for u in r.per_layer("use_rope_layers", use_rope, layers,
                                                    padded)),
        rope_scaling=tuple(scaling),
        intermediate_size=r.number("intermediate_size", default=0),
        moe_layers=moe_layers, moe_num_experts=experts,
        moe_top_k=r.number("moe_top_k", "num_experts_per_tok", default=0),
        moe_intermediate_size=r.number("moe_intermediate_size", default=0),
        share_expert_dim=r.number("share_expert_dim", "share_expert_dims",
                                  default=r.number("moe_intermediate_size", default=0)),
        moe_router_scaling_factor=r.number("moe_router_scaling_factor", kind=float)
        if moe_layers else 1.0,
        swiglu_limits=tuple(limits[0]), swiglu_limits_shared=tuple(limits[1]),
        norm_expert_weight=bool(r.get("norm_expert_weight", default=True)),
        use_moe_router_bias=bool(r.get("use_moe_router_bias", default=True)),
        num_nextn_predict_layers=nextn,
        rms_norm_eps=r.number("rms_norm_eps", default=1e-5, kind=float),
        max_position_embeddings=r.number("max_position_embeddings", "max_position_embedding"),
        tie_word_embeddings=bool(r.get("tie_word_embeddings",
                                       default=raw.get("tie_word_embeddings", False))),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else tuple(int(e) for e in
                                                    (eos if isinstance(eos, list) else [eos])),
        name=str(raw.get("_name_or_path") or text.get("_name_or_path") or where),
    )
    fields.update(overrides)
    return Step35Config(**fields)


AnyConfig = Step3Config | Step35Config


def from_any_dict(raw: dict, *, where: str = "config.json", **overrides) -> AnyConfig:
    """Either family, by ``model_type``: Step-3.5 (``step3p5``/``step3p7``) or Step-3."""
    if step35_model_type(raw) is not None:
        return from_step35_dict(raw, where=where, **overrides)
    return from_hub_dict(raw, where=where, **overrides)


def load_any_config(spec: str | Path, **overrides) -> AnyConfig:
    """A config of either family from a preset name, a ``config.json`` file or a checkpoint
    directory (``config.load_config`` reads only Step-3)."""
    raw, where, preset = read_config_source(spec)
    if preset is not None:
        overrides = {"name": preset, **overrides}
    return from_any_dict(raw, where=where, **overrides)
