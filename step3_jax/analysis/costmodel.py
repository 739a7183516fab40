"""The paper's decoding-cost model (``shared/spec/paper.md`` §3): Step-3 and eight other models.

Per decoded token at context ``c`` (each quantity summed over the layers):

* KV bytes read -- GQA ``c * 2 * n_kv * d * bytes``; MFA the same with one K and one V head;
  MLA ``c * 576 * bytes`` (512 latent + 64 rope); chunked layers read ``min(c, window)`` tokens;
  linear attention reads and writes its FP32 state ``n * d * d * 4 * 2`` whatever ``c``.
* Attention-core FLOPs (QK and PV) -- GQA/MFA ``c * 4 * n_q * d``; absorbed MLA
  ``c * 2 * 2 * n_q * 576`` (the paper charges the 576 width to PV too); linear attention the
  paper's constant (see ``paper_tables.MINIMAX_LIGHTNING_FLOPS_PER_TOKEN``).
* Linear FLOPs -- ``2 *`` the attention projection parameters. FFN FLOPs -- ``2 *`` the
  activated FFN parameters (dense layers, routed top-k and shared experts). The router is
  counted in neither, as in the paper's figures (with it DeepSeek-V3's FFN would read 4.86e10,
  not the paper's 4.84e10).
* Arithmetic intensity -- attention-core FLOPs / KV bytes.

Costs: ``U_FLOP = price / 3600 / FLOP/s`` (FP8 peak where the chip has FP8, else BF16) and
``U_byte = price / 3600 / bandwidth``; attention per token ``max(FLOP_attn * U_FLOP, KV * U_byte)
+ FLOP_linear * U_FLOP``; FFN per token ``FLOP_FFN * U_FLOP`` (compute-bound under AFD's large
batches); reported in USD per 1M tokens. The AFD total is the cheapest attention accelerator plus
the cheapest FFN accelerator.

Minimum MoE sparsity for high FFN MFU: the FFN batch must reach ``B = FLOP/s / (2 * S *
bandwidth)`` (FP8 expert weights, ``2 * S * B`` FLOPs per weight byte), and the ``3 * H * B``
network bytes of each of the ``L`` layers (FP8 out, BF16 back) must cross the per-server network
within the communication stage of a 3-stage pipeline, ``50 ms / 3``. Hence ``S >= H * FLOP/s *
L / (Net * bandwidth * T)`` with ``T = (2/3) * 50 ms / 3 = 11.1 ms``, the paper's constant, here
derived. ``H`` and ``L`` are Step-3's (from its config).

Step-3 is not typed in: :func:`step3_arch` reads ``configs/step3.json`` through
``weights.declare``, the declaration the model itself is built from. The other models are
descriptions citing their public configs (``paper_tables.py``).
"""

from __future__ import annotations

import math

import jax

from step3_jax.analysis.paper_tables import (COMPARISON_MODELS, HARDWARE,
                                             MINIMAX_LIGHTNING_FLOPS_PER_TOKEN, MODEL_NAMES, Arch,
                                             Attention, Ffn, Hardware, LayerGroup)
from step3_jax.errors import Step3Error
from step3_jax.model import weights
from step3_jax.model.config import Step3Config, load_config

TPOT_SLA_S = 0.050      # 50 ms per output token (20 tokens/s per user)
PIPELINE_STAGES = 3     # attention, communication, FFN (paper.md §2)
# Network bytes per token and layer, in units of H: FP8 activations out (1) + BF16 results back (2).
NET_BYTES_PER_H = 3


# ----- Step-3 from its weight declaration ---------------------------------------------------------

def _size(spec: weights.WeightSpec) -> int:
    return math.prod(spec.shape)


def _matmul_params(tree) -> int:
    """Parameters of the matmul weights in ``tree`` (norm scales, 1-D, are not projections)."""
    return sum(_size(s) for s in jax.tree.leaves(tree, is_leaf=weights.is_spec)
               if len(s.shape) >= 2)


def _axis(spec: weights.WeightSpec, name: str) -> int:
    return spec.shape[spec.axes.index(name)]


def _layer_from_declaration(cfg: Step3Config, layer: weights.Layer,
                            kv_dtype_bytes: float) -> tuple[Attention, Ffn]:
    attn = layer.attn
    attention = Attention(
        "mfa",
        q_heads=_axis(attn.wq, "heads"),
        head_dim=_axis(attn.k_proj, "head_dim"),
        kv_heads=cfg.num_attention_groups,  # k_proj/v_proj: [H, d], one shared head each
        proj_params=_matmul_params(attn),
        kv_dtype_bytes=kv_dtype_bytes)
    ffn = layer.ffn
    if isinstance(ffn, weights.Moe):
        routed = _size(ffn.gate) + _size(ffn.up) + _size(ffn.down)
        n_experts = _axis(ffn.gate, "experts")
        shared = _matmul_params(ffn.shared)
        per_expert = routed // n_experts
        desc = Ffn(activated_params=shared + cfg.moe_top_k * per_expert,
                   total_params=shared + routed, routed_experts=n_experts,
                   top_k=cfg.moe_top_k, shared_experts=1, routed_expert_params=per_expert)
    else:
        p = _matmul_params(ffn)
        desc = Ffn(activated_params=p, total_params=p)
    return attention, desc


def step3_arch(cfg: Step3Config | None = None, kv_dtype_bytes: float = 1.0) -> Arch:
    """Step-3 as the cost model sees it, read off ``weights.declare(cfg)`` layer by layer."""
    cfg = load_config("step3") if cfg is None else cfg
    counts: dict[tuple[Attention, Ffn], int] = {}
    for layer in weights.declare(cfg).layers:
        key = _layer_from_declaration(cfg, layer, kv_dtype_bytes)
        counts[key] = counts.get(key, 0) + 1
    groups = tuple(LayerGroup(n, a, f) for (a, f), n in counts.items())
    return Arch("Step-3", cfg.hidden_size, groups, f"configs/{cfg.name}.json via weights.declare")


def all_archs(cfg: Step3Config | None = None) -> tuple[Arch, ...]:
    """The nine models in the paper's order, Step-3 last."""
    return COMPARISON_MODELS + (step3_arch(cfg),)


# ----- per decoded token --------------------------------------------------------------------------

def _tokens(a: Attention, context: int) -> int:
    return context if a.window is None else min(context, a.window)


def layer_kv_bytes(a: Attention, context: int) -> float:
    """KV (or state) bytes one layer reads for one token at ``context``."""
    if a.kind == "linear":
        return a.q_heads * a.head_dim * a.head_dim * a.kv_dtype_bytes
    if a.kind == "mla":
        return _tokens(a, context) * a.head_dim * a.kv_dtype_bytes
    return _tokens(a, context) * 2 * a.kv_heads * a.head_dim * a.kv_dtype_bytes


def layer_attn_flops(a: Attention, context: int) -> float:
    """Attention-core FLOPs (QK and PV) of one layer for one token at ``context``."""
    if a.kind == "linear":
        return a.state_flops
    return _tokens(a, context) * 4 * a.q_heads * a.head_dim


def kv_bytes(arch: Arch, context: int) -> float:
    return sum(g.count * layer_kv_bytes(g.attention, context) for g in arch.groups)


def attn_flops(arch: Arch, context: int) -> float:
    return sum(g.count * layer_attn_flops(g.attention, context) for g in arch.groups)


def linear_flops(arch: Arch) -> int:
    return sum(g.count * 2 * g.attention.proj_params for g in arch.groups)


def ffn_flops(arch: Arch) -> int:
    return sum(g.count * 2 * g.ffn.activated_params for g in arch.groups)


def activated_params(arch: Arch) -> int:
    """Attention projections plus activated FFN (embedding, LM head, norms, router left out)."""
    return (linear_flops(arch) + ffn_flops(arch)) // 2


def moe_sparsity(arch: Arch) -> float:
    """Activated / total experts, shared experts counted in both (1.0 for a dense model)."""
    f = next((g.ffn for g in arch.groups if g.ffn.routed_experts), None)
    if f is None:
        return 1.0
    return (f.top_k + f.shared_experts) / (f.routed_experts + f.shared_experts)


# ----- dollars ------------------------------------------------------------------------------------

def attention_usd(arch: Arch, hw: Hardware, context: int) -> float:
    """USD per decoded token for attention on ``hw``."""
    return (max(attn_flops(arch, context) * hw.u_flop, kv_bytes(arch, context) * hw.u_byte)
            + linear_flops(arch) * hw.u_flop)


def ffn_usd(arch: Arch, hw: Hardware) -> float:
    """USD per decoded token for the FFN on ``hw`` (compute-bound)."""
    return ffn_flops(arch) * hw.u_flop


def min_sparsity(hw: Hardware, hidden: int, layers: int) -> float:
    """Smallest MoE sparsity at which ``hw`` can keep its FFN compute-bound within the SLA."""
    comm_budget = TPOT_SLA_S / PIPELINE_STAGES * 2 / NET_BYTES_PER_H  # 11.1 ms
    return hidden * hw.flops * layers / (hw.server_net * hw.bandwidth * comm_budget)


def check_context(context: int) -> None:
    if context < 1:
        raise Step3Error(f"--context must be a positive number of tokens, got {context}")


NOTES = (
    f"MiniMax-M1: its 70 lightning-attention layers add the paper's underived constant of "
    f"{MINIMAX_LIGHTNING_FLOPS_PER_TOKEN:.2g} FLOPs per token to the attention FLOPs "
    "(paper.md §3); a recurrent-state count (2*d^2 for k^T v and 2*d^2 for q*S per head) gives "
    "2.94e8, 40% of it. Its state bytes (70 x 64 x 128 x 128 x FP32, read and written) are "
    "derived.",
    "min_sparsity uses Step-3's hidden size and layer count with the paper's per-server network "
    "(8 NICs) against per-accelerator FLOP/s and bandwidth; 11.1 ms = (2/3) x 50 ms / 3 (FP8 "
    "out plus BF16 back is 3H bytes per token within one of the three pipeline stages).",
    "Router weights are counted neither in linear nor in FFN FLOPs, as in the paper's figures "
    "(DeepSeek-V3's FFN would read 4.86e10 with them, not 4.84e10).",
    "MLA (DeepSeek-V3, Kimi K2) attention FLOPs follow the paper: 4 x heads x 576 per cached "
    "token, i.e. the PV product is charged over the 576-wide latent+rope as well.",
    "Accelerators without FP8 (A800, 910B) are charged at their BF16 peak with FP8 weights and "
    "8-bit KV still assumed, as in the paper.",
)


def report(context: int = 8192, cfg: Step3Config | None = None, extra: tuple = ()) -> dict:
    """The ``step3-jax cost --json`` document: the paper's nine models, then ``extra`` archs
    (``analysis.step35.cost_report`` adds the configs ``cost --config`` names)."""
    check_context(context)
    archs = all_archs(cfg)
    step3 = archs[-1]
    names = [a.name for a in archs + tuple(extra)]
    if len(set(names)) < len(names):
        raise Step3Error(f"a model is named twice in the cost table: {', '.join(names[9:])}")
    archs += tuple(extra)
    models = {}
    for arch in archs:
        costs = {}
        for hw in HARDWARE.values():
            a, f = attention_usd(arch, hw, context) * 1e6, ffn_usd(arch, hw) * 1e6
            costs[hw.name] = {"attention": a, "ffn": f, "total": a + f}
        best_a = min(costs, key=lambda h: costs[h]["attention"])
        best_f = min(costs, key=lambda h: costs[h]["ffn"])
        kv, flops = kv_bytes(arch, context), attn_flops(arch, context)
        models[arch.name] = {
            "kv_bytes": kv,
            "attn_flops": flops,
            "linear_flops": linear_flops(arch),
            "ffn_flops": ffn_flops(arch),
            "arithmetic_intensity": flops / kv,
            "cost_usd_per_m_tokens": costs,
            "afd_usd_per_m_tokens": costs[best_a]["attention"] + costs[best_f]["ffn"],
            "afd_choice": {"attention": best_a, "ffn": best_f},
            "activated_params": activated_params(arch),
            "moe_sparsity": moe_sparsity(arch),
            "source": arch.source,
        }
    assert tuple(models)[:len(MODEL_NAMES)] == MODEL_NAMES
    hardware = {hw.name: {"usd_per_hour": hw.usd_per_hour, "bf16_flops": hw.bf16_flops,
                          "fp8_flops": hw.fp8_flops, "bandwidth": hw.bandwidth,
                          "server_network": hw.server_net, "roofline": hw.roofline,
                          "u_flop": hw.u_flop, "u_byte": hw.u_byte}
                for hw in HARDWARE.values()}
    return {
        "context": context,
        "hardware": hardware,
        "models": models,
        "min_sparsity": {hw.name: min_sparsity(hw, step3.hidden, step3.layers)
                         for hw in HARDWARE.values()},
        "notes": list(NOTES),
    }


# ----- presentation -------------------------------------------------------------------------------

def format_report(doc: dict) -> str:
    """The aligned tables ``step3-jax cost`` prints without ``--json``."""
    hws = list(doc["hardware"])
    name_w = max(len(n) for n in doc["models"]) + 2
    lines = [f"Per decoded token at context {doc['context']:,} (KV bytes; the rest FLOPs)", ""]
    lines.append(f"{'model':<{name_w}}{'KV bytes':>10}{'attention':>11}{'linear':>10}"
                 f"{'FFN':>10}{'intensity':>11}{'activated':>11}{'sparsity':>10}")
    for name, m in doc["models"].items():
        lines.append(f"{name:<{name_w}}{m['kv_bytes']:>10.3g}{m['attn_flops']:>11.3g}"
                     f"{m['linear_flops']:>10.3g}{m['ffn_flops']:>10.3g}"
                     f"{m['arithmetic_intensity']:>11.4g}{m['activated_params'] / 1e9:>10.1f}B"
                     f"{m['moe_sparsity']:>10.3f}")
    lines += ["", "USD per 1M decoded tokens (attention + FFN on one accelerator; AFD = cheapest "
              "attention + cheapest FFN)", ""]
    lines.append(f"{'model':<{name_w}}" + "".join(f"{h:>9}" for h in hws)
                 + f"{'AFD':>9}  attention + FFN")
    for name, m in doc["models"].items():
        c = m["cost_usd_per_m_tokens"]
        lines.append(f"{name:<{name_w}}" + "".join(f"{c[h]['total']:>9.4f}" for h in hws)
                     + f"{m['afd_usd_per_m_tokens']:>9.4f}  "
                       f"{m['afd_choice']['attention']} + {m['afd_choice']['ffn']}")
    lines += ["", "Minimum MoE sparsity for high FFN MFU (Step-3's H and L): "
              + ", ".join(f"{h} {s:.4f}" for h, s in doc["min_sparsity"].items())]
    for name, m in doc["models"].items():
        if "min_sparsity" in m:  # a model added with --config: its own H and L
            lines.append(f"  {name}'s H and L: "
                         + ", ".join(f"{h} {s:.4f}" for h, s in m["min_sparsity"].items())
                         + f" (its sparsity {m['moe_sparsity']:.4f})")
    for name, m in doc["models"].items():
        kinds = m.get("by_attention_kind", {})
        if kinds:
            lines.append("")
            lines.append(f"{name} by attention kind at context {doc['context']:,}: " + "; ".join(
                f"{k.split('_')[0]} {v['layers']} layers, KV {v['kv_bytes']:.3g} B, attention "
                f"{v['attn_flops']:.3g} FLOPs, intensity {v['arithmetic_intensity']:.4g}"
                for k, v in kinds.items()))
    lines += ["", "Notes:"]
    lines += [f"  - {n}" for n in doc["notes"]]
    return "\n".join(lines)


def plot_report(doc: dict, path: str) -> None:
    """Cost per 1M tokens against activated parameters (the paper's Figure-1 view), as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Step3Error("--plot needs matplotlib: pip install matplotlib "
                         "(or pip install 'step3-jax[plot]')") from None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, m in doc["models"].items():
        x = m["activated_params"] / 1e9
        afd, h800 = m["afd_usd_per_m_tokens"], m["cost_usd_per_m_tokens"]["H800"]["total"]
        color = "tab:red" if name.startswith("Step-3") else "tab:blue"
        ax.scatter([x], [afd], color=color, zorder=3)
        ax.scatter([x], [h800], facecolors="none", edgecolors=color, zorder=3)
        ax.plot([x, x], [afd, h800], color=color, lw=0.6, alpha=0.5)
        ax.annotate(name, (x, afd), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.scatter([], [], color="gray", label="AFD (cheapest attention + cheapest FFN hardware)")
    ax.scatter([], [], facecolors="none", edgecolors="gray", label="all on H800")
    ax.set_xlabel("activated parameters per token (billions; attention projections + FFN)")
    ax.set_ylabel("USD per 1M decoded tokens")
    ax.set_title(f"Theoretical decoding cost at context {doc['context']:,}")
    top = max(m["cost_usd_per_m_tokens"]["H800"]["total"] for m in doc["models"].values())
    ax.set_ylim(0, top * 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:
        raise Step3Error(f"--plot {path}: cannot write ({e})") from None
    finally:
        plt.close(fig)
