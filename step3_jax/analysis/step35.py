"""The paper's analysis applied to the Step-3.5 family (``shared/spec/step35.md``), read off a
:class:`~step3_jax.model.step35_config.Step35Config`: parameters, KV-cache bytes with the sliding
window, the decoding-cost model's figures beside Step-3 and the paper's other models.

Every figure comes from the config through :func:`hub_tensor_shapes`, the spec's §3 tensor table
(the trunk's tensors and their Hub shapes). Assumptions (also in every output, :data:`ASSUMPTIONS`):

1. **KV cache.** Every layer caches 8 K and 8 V heads of 128 (``num_attention_groups`` x
   ``head_dim``; only the query heads differ between layer kinds, spec §4). A full-attention layer
   keeps every position; a sliding layer keeps the last ``sliding_window`` positions, the current
   one included (a ring of ``window`` slots), so a sequence of ``c`` tokens holds
   ``L_full * c + L_sliding * min(c, window)`` positions' K and V. Past the window each new token
   adds only the full layers' bytes; the sliding layers' rings are a fixed cost per sequence.
2. **Bytes read per decoded token** equal the bytes held (each layer reads all it keeps), in the
   paper's 8-bit KV; ``info`` also gives BF16 (the Hub checkpoint's dtype) and float32.
3. **Attention FLOPs** are the paper's ``positions read x 4 x query heads x head_dim`` per layer
   (QK and PV); arithmetic intensity is that over the KV bytes read: 4 x 64 / (2 x 8) = 16 on a
   full layer, 4 x 96 / 16 = 24 on a sliding one (8-bit KV), and for the whole model a weighted
   mix that depends on the context.
4. **Linear FLOPs** are 2 x the attention projections: q, k, v, o and the head gate ``g_proj``.
   QK norm, the gate's sigmoid, RoPE and the softmax are elementwise work, not counted (the
   paper counts none for any model).
5. **FFN FLOPs** are 2 x (dense SwiGLU, or top-k routed + the shared expert); the router (and its
   bias) is left out of FFN and linear FLOPs, as for every model in the paper's tables; it is
   counted in the parameters. The SwiGLU clamps change no FLOP count.
6. **MTP** layers (``num_nextn_predict_layers``) are left out: decoding without speculation, as
   the paper's figures assume no MTP. Embedding and LM head are left out of the cost model (paper:
   < 5%); activated parameters exclude the input embedding and count the LM head (as Step-3's).
7. **MoE sparsity** ``(top_k + shared) / (experts + shared)``, shared experts counted in both
   (the paper's definition); the minimum sparsity uses this model's own hidden size and layer
   count in the paper's formula.
"""

from __future__ import annotations

import dataclasses
import math

from step3_jax.analysis import costmodel
from step3_jax.analysis.paper_tables import Arch, Attention, Ffn, HARDWARE, LayerGroup
from step3_jax.model.step35_config import FULL, SLIDING, Step35Config

BYTES = {"fp8": 1, "bfloat16": 2, "float32": 4}
CONTEXTS = (8192, 32768)

ASSUMPTIONS = (
    "Step-3.5 KV: full-attention layers keep every position, sliding layers the last "
    "sliding_window positions (the current one included: a ring of window slots); K/V heads are "
    "num_attention_groups x head_dim on every layer. Bytes read per decoded token = bytes held.",
    "Step-3.5 attention FLOPs: positions read x 4 x query heads x head_dim per layer, with each "
    "layer kind's own query-head count; linear FLOPs: 2 x the q, k, v, o and head-gate (g_proj) "
    "projections; QK norm, gate sigmoid, RoPE and softmax not counted.",
    "Step-3.5 FFN FLOPs: 2 x (dense SwiGLU, or top-k routed + the shared expert); the router and "
    "its bias are left out as for every model here; the SwiGLU clamps add no FLOPs.",
    "Step-3.5 MTP layers are left out (no speculative decoding, as the paper assumes no MTP); "
    "8-bit KV and FP8 weights as for every model here, though the Hub checkpoint is BF16.",
    "Step-3.5's minimum sparsity uses its own hidden size and layer count in the paper's formula.",
)


# ----- the trunk's tensors ------------------------------------------------------------------------

def hub_tensor_shapes(cfg: Step35Config) -> dict[str, tuple[int, ...]]:
    """Every trunk tensor's Hub name and shape (spec §3; MTP layers >= ``num_hidden_layers``
    not included), the vocabulary at its real size."""
    H, d, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for spec in cfg.layers:
        p, n, kv = f"model.layers.{spec.index}.", spec.q_heads, spec.kv_heads
        out.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "self_attn.q_proj.weight": (n * d, H),
                    p + "self_attn.k_proj.weight": (kv * d, H),
                    p + "self_attn.v_proj.weight": (kv * d, H),
                    p + "self_attn.o_proj.weight": (H, n * d),
                    p + "self_attn.g_proj.weight": (n, H),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if spec.moe:
            E, Fe, Fs = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.share_expert_dim
            out.update({p + "moe.gate.weight": (E, H), p + "moe.gate_proj.weight": (E, Fe, H),
                        p + "moe.up_proj.weight": (E, Fe, H), p + "moe.down_proj.weight": (E, H, Fe)})
            if cfg.use_moe_router_bias:
                out[p + "moe.router_bias"] = (E,)
            if Fs:
                out.update({p + "share_expert.gate_proj.weight": (Fs, H),
                            p + "share_expert.up_proj.weight": (Fs, H),
                            p + "share_expert.down_proj.weight": (H, Fs)})
        else:
            I = cfg.intermediate_size
            out.update({p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                        p + "mlp.down_proj.weight": (H, I)})
    return out


def _part(name: str) -> str:
    if name.startswith("model.embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    for key, part in ((".moe.gate.", "router"), (".moe.router_bias", "router"),
                      (".moe.", "routed_experts"), (".share_expert.", "shared_experts"),
                      (".mlp.", "dense_ffn"), ("_norm.", "norms"), ("norm.weight", "norms"),
                      (".self_attn.", "attention")):
        if key in name:
            return part
    raise AssertionError(name)


def param_counts(cfg: Step35Config) -> dict:
    """Total and per-token activated parameters of the trunk, and the total by part. Activated
    follows Step-3's convention (``weights.count_params``): the input embedding left out, routed
    experts at ``top_k / experts``, everything else (router, shared expert, LM head) whole."""
    parts: dict[str, int] = {}
    for name, shape in hub_tensor_shapes(cfg).items():
        parts[_part(name)] = parts.get(_part(name), 0) + math.prod(shape)
    total = sum(parts.values())
    routed = parts.get("routed_experts", 0)
    activated = total - parts["embedding"] - routed + routed * cfg.moe_top_k // max(
        cfg.moe_num_experts, 1)
    return {"total": total, "activated": activated, "by_part": parts}


# ----- the cost model's view ----------------------------------------------------------------------

def arch(cfg: Step35Config, kv_dtype_bytes: float = 1.0) -> Arch:
    """The model as ``costmodel`` sees it, layer by layer from :func:`hub_tensor_shapes`."""
    shapes = hub_tensor_shapes(cfg)
    counts: dict[tuple[Attention, Ffn], int] = {}
    for spec in cfg.layers:
        p = f"model.layers.{spec.index}."
        proj = sum(math.prod(s) for n, s in shapes.items()
                   if n.startswith(p + "self_attn.") and len(s) == 2)
        attention = Attention("gqa", spec.q_heads, spec.head_dim, spec.kv_heads, proj,
                              kv_dtype_bytes, window=spec.window)
        if spec.moe:
            per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
            shared = 3 * cfg.hidden_size * cfg.share_expert_dim
            ffn = Ffn(activated_params=shared + cfg.moe_top_k * per_expert,
                      total_params=shared + cfg.moe_num_experts * per_expert,
                      routed_experts=cfg.moe_num_experts, top_k=cfg.moe_top_k,
                      shared_experts=1 if shared else 0, routed_expert_params=per_expert)
        else:
            dense = 3 * cfg.hidden_size * cfg.intermediate_size
            ffn = Ffn(activated_params=dense, total_params=dense)
        counts[(attention, ffn)] = counts.get((attention, ffn), 0) + 1
    return Arch(display_name(cfg), cfg.hidden_size,
                tuple(LayerGroup(n, a, f) for (a, f), n in counts.items()),
                f"{cfg.name} (step35_config)")


def display_name(cfg) -> str:
    family = "Step-3.5" if isinstance(cfg, Step35Config) else "Step-3"
    return f"{family} ({cfg.name})"


def _by_kind(cfg: Step35Config, context: int) -> dict:
    """Per attention kind: layers, KV bytes read (8-bit) and core FLOPs at ``context``."""
    out = {}
    for kind in (FULL, SLIDING):
        specs = [s for s in cfg.layers if s.attention == kind]
        if not specs:
            continue
        kv = sum(cfg.kv_positions(s.index, context) * 2 * s.kv_heads * s.head_dim for s in specs)
        flops = sum(cfg.kv_positions(s.index, context) * 4 * s.q_heads * s.head_dim for s in specs)
        out[kind] = {"layers": len(specs), "kv_bytes": kv, "attn_flops": flops,
                     "arithmetic_intensity": flops / kv}
    return out


def _intensity(cfg: Step35Config, context: int) -> dict:
    """Attention FLOPs per KV byte (8-bit) per layer kind and for the whole model."""
    kinds = _by_kind(cfg, context)
    model = sum(v["attn_flops"] for v in kinds.values()) / sum(v["kv_bytes"] for v in kinds.values())
    return {k: v["arithmetic_intensity"] for k, v in kinds.items()} | {"model": model}


def cost_report(context: int, configs) -> dict:
    """``step3-jax cost --config ...``: the paper's nine models plus one row per config (either
    family), each extra row with its own minimum sparsity; Step-3.5 rows split by layer kind."""
    extra = [arch(c) if isinstance(c, Step35Config)
             else dataclasses.replace(costmodel.step3_arch(c), name=display_name(c))
             for c in configs]
    doc = costmodel.report(context, extra=extra)
    for cfg, a in zip(configs, extra):
        m = doc["models"][a.name]
        m["min_sparsity"] = {hw.name: costmodel.min_sparsity(hw, a.hidden, a.layers)
                             for hw in HARDWARE.values()}
        if isinstance(cfg, Step35Config):
            m["by_attention_kind"] = _by_kind(cfg, context)
    if any(isinstance(c, Step35Config) for c in configs):
        doc["notes"] += list(ASSUMPTIONS)
    return doc


# ----- info ---------------------------------------------------------------------------------------

def info(cfg: Step35Config) -> dict:
    """``step3-jax info`` for a Step-3.5 config (JSON document). KV per sequence at 8K and 32K
    where the model reaches them, else at its ``max_position_embeddings``."""
    contexts = [c for c in CONTEXTS if c <= cfg.max_position_embeddings] or \
        [cfg.max_position_embeddings]
    counts = param_counts(cfg)
    per_position = 2 * cfg.num_attention_groups * cfg.head_dim
    full = sum(not cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    sliding = cfg.num_hidden_layers - full
    window = cfg.sliding_window or 0
    bytes_of = lambda values: {k: values * b for k, b in BYTES.items()}  # noqa: E731
    e = max(cfg.moe_num_experts, 1)
    shared = 1 if cfg.share_expert_dim else 0
    return {
        "config": cfg.name, "family": "step3p5",
        "parameters": counts["total"], "activated_parameters": counts["activated"],
        "parameters_by_part": counts["by_part"],
        "layers": cfg.num_hidden_layers, "moe_layers": len(cfg.moe_layers),
        "dense_layers": cfg.num_hidden_layers - len(cfg.moe_layers),
        "full_attention_layers": full, "sliding_attention_layers": sliding,
        "sliding_window": cfg.sliding_window, "mtp_layers_not_counted": cfg.num_nextn_predict_layers,
        "query_heads": {k: sorted({s.q_heads for s in cfg.layers if s.attention == k})
                        for k in (FULL, SLIDING)},
        "kv_heads": cfg.num_attention_groups, "head_dim": cfg.head_dim,
        "kv_bytes_per_token": bytes_of(full * per_position),
        "kv_window_bytes_per_sequence": bytes_of(sliding * window * per_position),
        "kv_bytes_per_token_without_window": bytes_of(cfg.num_hidden_layers * per_position),
        "kv_bytes_per_sequence": {str(c): bytes_of(cfg.kv_elements(c)) for c in contexts},
        "arithmetic_intensity": {str(c): _intensity(cfg, c) for c in contexts},
        "moe_sparsity": (cfg.moe_top_k + shared) / (e + shared) if cfg.moe_layers else 1.0,
        "vocab_size": cfg.vocab_size, "padded_vocab": cfg.padded_vocab,
        "assumptions": list(ASSUMPTIONS),
    }


def format_info(doc: dict) -> str:
    """The lines ``step3-jax info`` prints for a Step-3.5 config."""
    kv, ring = doc["kv_bytes_per_token"], doc["kv_window_bytes_per_sequence"]
    heads = doc["query_heads"]
    lines = [
        f"config               {doc['config']} (Step-3.5 family)",
        f"parameters           {doc['parameters']:,} ({doc['parameters'] / 1e9:.1f}B"
        + (f"; the {doc['mtp_layers_not_counted']} MTP layer(s) not counted)"
           if doc["mtp_layers_not_counted"] else ")"),
        f"activated / token    {doc['activated_parameters']:,} "
        f"({doc['activated_parameters'] / 1e9:.1f}B, input embedding excluded)",
        f"layers               {doc['layers']} ({doc['dense_layers']} dense, {doc['moe_layers']} "
        f"MoE; {doc['full_attention_layers']} full attention, {doc['sliding_attention_layers']} "
        f"sliding window {doc['sliding_window']})",
        f"attention            query heads {'/'.join(map(str, heads[FULL])) or '-'} full, "
        f"{'/'.join(map(str, heads[SLIDING])) or '-'} sliding; {doc['kv_heads']} K/V heads of "
        f"{doc['head_dim']} on every layer",
        f"KV bytes / token     {kv['fp8']:,} (fp8)  {kv['bfloat16']:,} (bf16)  {kv['float32']:,} "
        f"(f32): the full layers; without the window "
        f"{doc['kv_bytes_per_token_without_window']['bfloat16']:,} (bf16)",
        f"sliding-window KV    {ring['fp8']:,} (fp8)  {ring['bfloat16']:,} (bf16) per sequence, "
        f"fixed once it holds {doc['sliding_window']} tokens",
    ]
    for c, b in doc["kv_bytes_per_sequence"].items():
        ai = doc["arithmetic_intensity"][c]
        lines.append(f"KV at {int(c):,} tokens".ljust(21) + f"{b['bfloat16']:,} (bf16) per sequence"
                     f", {b['bfloat16'] / int(c):,.0f} B/token; attention intensity "
                     f"{ai['model']:.2f} FLOP/B (fp8 KV)")
    lines += [f"MoE sparsity         {doc['moe_sparsity']:.4f} (top-k + shared over experts + "
              "shared)",
              f"vocabulary           {doc['vocab_size']} (padded to {doc['padded_vocab']})"]
    return "\n".join(lines)

