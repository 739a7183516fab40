"""The paper's inputs as data: the hardware table and the comparison models' architectures.

Only *descriptions* live here: the accelerators of the paper's Table 4, and the eight models the
paper compares Step-3 with, each written from its public ``config.json`` (values cited beside
it). Step-3 itself is not described here: ``costmodel.step3_arch`` derives it from
``configs/step3.json`` through the same weight declaration the model runs on. The formulas that
turn a description into bytes, FLOPs and dollars are in ``costmodel.py`` (``shared/spec/paper.md``
§3).

Conventions (paper.md §3): 8-bit KV cache and FP8 weights unless a model's layers say otherwise;
embedding and LM head left out; 2 FLOPs per multiply-accumulate.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# ----- hardware (paper Table 4) -------------------------------------------------------------------

GPUS_PER_SERVER = 8  # a server has 8 accelerators and 8 NICs (paper.md §3: "per-server network")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator: rental price, peak FLOP/s, memory bandwidth and its server's network."""

    name: str
    usd_per_hour: float
    bf16_flops: float
    fp8_flops: float | None  # None: no FP8 units (A800, 910B)
    bandwidth: float         # memory, bytes/s
    server_net: float        # network of one 8-accelerator server, bytes/s

    @property
    def flops(self) -> float:
        """The peak the cost model charges: FP8 where the chip has it, else BF16."""
        return self.fp8_flops if self.fp8_flops is not None else self.bf16_flops

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for GEMMs in ``dtype`` ("fp8" falls back to BF16 without FP8 units)."""
        return self.bf16_flops if dtype == "bf16" else self.flops

    @property
    def roofline(self) -> float:
        """FLOPs per byte at which compute and memory time are equal."""
        return self.flops / self.bandwidth

    @property
    def u_flop(self) -> float:
        """USD per FLOP: ``price / 3600 / FLOP/s``."""
        return self.usd_per_hour / 3600 / self.flops

    @property
    def u_byte(self) -> float:
        """USD per byte of memory read: ``price / 3600 / bandwidth``."""
        return self.usd_per_hour / 3600 / self.bandwidth

    @property
    def nic(self) -> float:
        """Network bytes/s of one accelerator (its server's network over its 8 NICs)."""
        return self.server_net / GPUS_PER_SERVER


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("H800", 2.0, 9.89e14, 1.98e15, 3.35e12, 400e9),
    Hardware("H20", 0.8, 1.48e14, 2.96e14, 4.00e12, 400e9),
    Hardware("A800", 0.75, 3.12e14, None, 2.00e12, 200e9),
    Hardware("910B", 0.67, 2.80e14, None, 1.60e12, 200e9),  # Huawei Ascend 910B
)}


# ----- architecture descriptions ------------------------------------------------------------------

AttentionKind = Literal["gqa", "mfa", "mla", "linear"]


@dataclasses.dataclass(frozen=True)
class Attention:
    """The attention of one layer, as the decoding-cost model sees it.

    ``gqa``/``mfa``: ``kv_heads`` K heads and as many V heads of ``head_dim`` are cached per token
    (MFA: one of each). ``mla``: one latent of ``head_dim`` (kv_lora + rope = 576) per token,
    shared by K and V (absorbed MLA). ``linear``: a recurrent state of ``q_heads x head_dim x
    head_dim`` per sequence, whatever the context; its FLOPs per token are ``state_flops``.
    """

    kind: AttentionKind
    q_heads: int
    head_dim: int
    kv_heads: int = 1
    proj_params: int = 0          # the projections around the core (q/k/v/o, ...) of one layer
    kv_dtype_bytes: float = 1.0   # 8-bit KV unless noted
    window: int | None = None     # chunked attention reads min(context, window) tokens
    state_flops: float = 0.0      # ``linear`` only: core FLOPs per token of one layer


@dataclasses.dataclass(frozen=True)
class Ffn:
    """The FFN of one layer: parameters applied to each token, and parameters held."""

    activated_params: int          # dense FFN, or (top_k routed + shared) experts
    total_params: int              # everything the layer holds (all experts)
    routed_experts: int = 0        # 0: a dense FFN
    top_k: int = 0
    shared_experts: int = 0
    routed_expert_params: int = 0  # one routed expert

    @property
    def always_on_params(self) -> int:
        """Parameters every token uses: the dense FFN, or the shared experts."""
        return self.total_params - self.routed_experts * self.routed_expert_params


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """``count`` identical decoder layers."""

    count: int
    attention: Attention
    ffn: Ffn


@dataclasses.dataclass(frozen=True)
class Arch:
    """A model as the cost model sees it: hidden size and its layers, grouped."""

    name: str
    hidden: int
    groups: tuple[LayerGroup, ...]
    source: str = ""

    @property
    def layers(self) -> int:
        return sum(g.count for g in self.groups)


# ----- building blocks from config values ---------------------------------------------------------

def swiglu(hidden: int, width: int) -> int:
    """gate, up and down projections."""
    return 3 * hidden * width


def dense(hidden: int, width: int) -> Ffn:
    p = swiglu(hidden, width)
    return Ffn(activated_params=p, total_params=p)


def moe(hidden: int, width: int, routed: int, top_k: int, shared: int = 0) -> Ffn:
    """``routed`` experts of ``width`` (top-``top_k``) plus ``shared`` always-on experts."""
    e = swiglu(hidden, width)
    return Ffn(activated_params=(top_k + shared) * e, total_params=(routed + shared) * e,
               routed_experts=routed, top_k=top_k, shared_experts=shared, routed_expert_params=e)


def gqa(hidden: int, q_heads: int, kv_heads: int, head_dim: int, **kw) -> Attention:
    """q, k, v and o projections around grouped-query attention."""
    proj = hidden * q_heads * head_dim + 2 * hidden * kv_heads * head_dim \
        + q_heads * head_dim * hidden
    return Attention("gqa", q_heads, head_dim, kv_heads, proj, **kw)


def mla(hidden: int, heads: int, q_lora: int, kv_lora: int, rope: int, nope: int,
        v_dim: int) -> Attention:
    """DeepSeek MLA: q_a/q_b, kv_a (latent + rope), kv_b (to K-nope and V), o."""
    proj = (hidden * q_lora + q_lora * heads * (nope + rope) + hidden * (kv_lora + rope)
            + kv_lora * heads * (nope + v_dim) + heads * v_dim * hidden)
    return Attention("mla", heads, kv_lora + rope, 1, proj)


# MiniMax-M1's lightning-attention FLOPs: the paper's Table 2 carries this constant (paper.md §3:
# "about 7.4e8 per token on top of the GQA layers' term", over its 70 lightning layers) without
# deriving it. A recurrent derivation -- per head, k^T v into the d x d state and q times the
# state, 2 d^2 FLOPs each -- gives 4 * 128^2 * 64 * 70 = 2.94e8, 40% of it. We use the paper's
# figure and say so in every output's notes.
MINIMAX_LIGHTNING_FLOPS_PER_TOKEN = 7.4e8


def _minimax_m1() -> Arch:
    # MiniMaxAI/MiniMax-M1-80k config.json: hidden_size 6144, num_hidden_layers 80,
    # num_attention_heads 64, num_key_value_heads 8, head_dim 128, attn_type_list 7x lightning (0)
    # then 1x softmax (1), repeated: 70 lightning + 10 softmax layers; num_local_experts 32,
    # num_experts_per_tok 2, intermediate_size 9216, no shared expert.
    H, n, d = 6144, 64, 128
    lightning = Attention("linear", n, d, proj_params=5 * H * n * d,  # q, k, v, output gate, out
                          kv_dtype_bytes=4.0 * 2,  # FP32 state, read and written each token
                          state_flops=MINIMAX_LIGHTNING_FLOPS_PER_TOKEN / 70)
    ffn = moe(H, 9216, routed=32, top_k=2)
    return Arch("MiniMax-M1", H, (
        LayerGroup(70, lightning, ffn),
        LayerGroup(10, gqa(H, n, 8, d, kv_dtype_bytes=2.0), ffn),  # full attention keeps BF16 KV
    ), "MiniMaxAI/MiniMax-M1-80k config.json")


def _comparison_models() -> tuple[Arch, ...]:
    # deepseek-ai/DeepSeek-V3 config.json: hidden_size 7168, num_hidden_layers 61,
    # num_attention_heads 128, q_lora_rank 1536, kv_lora_rank 512, qk_rope_head_dim 64,
    # qk_nope_head_dim 128, v_head_dim 128, first_k_dense_replace 3, intermediate_size 18432,
    # n_routed_experts 256, num_experts_per_tok 8, n_shared_experts 1, moe_intermediate_size 2048.
    H = 7168
    ds_attn = mla(H, 128, 1536, 512, 64, 128, 128)
    deepseek = Arch("DeepSeek-V3", H, (
        LayerGroup(3, ds_attn, dense(H, 18432)),
        LayerGroup(58, ds_attn, moe(H, 2048, routed=256, top_k=8, shared=1)),
    ), "deepseek-ai/DeepSeek-V3 config.json")

    # moonshotai/Kimi-K2-Instruct config.json: as DeepSeek-V3 but num_attention_heads 64,
    # first_k_dense_replace 1, n_routed_experts 384 (num_experts_per_tok 8, n_shared_experts 1).
    k2_attn = mla(H, 64, 1536, 512, 64, 128, 128)
    kimi = Arch("Kimi K2", H, (
        LayerGroup(1, k2_attn, dense(H, 18432)),
        LayerGroup(60, k2_attn, moe(H, 2048, routed=384, top_k=8, shared=1)),
    ), "moonshotai/Kimi-K2-Instruct config.json")

    # Qwen/Qwen3-235B-A22B config.json: hidden_size 4096, num_hidden_layers 94,
    # num_attention_heads 64, num_key_value_heads 4, head_dim 128, num_experts 128,
    # num_experts_per_tok 8, moe_intermediate_size 1536, every layer MoE, no shared expert.
    qwen_moe = Arch("Qwen3 MoE", 4096, (
        LayerGroup(94, gqa(4096, 64, 4, 128), moe(4096, 1536, routed=128, top_k=8)),
    ), "Qwen/Qwen3-235B-A22B config.json")

    # Qwen/Qwen3-32B config.json: hidden_size 5120, num_hidden_layers 64, num_attention_heads 64,
    # num_key_value_heads 8, head_dim 128, intermediate_size 25600 (dense).
    qwen_dense = Arch("Qwen3 32B", 5120, (
        LayerGroup(64, gqa(5120, 64, 8, 128), dense(5120, 25600)),
    ), "Qwen/Qwen3-32B config.json")

    # meta-llama/Llama-4-Maverick-17B-128E config.json (text_config): hidden_size 5120,
    # num_hidden_layers 48, num_attention_heads 40, num_key_value_heads 8, head_dim 128,
    # attention_chunk_size 8192 with every 4th layer global (no_rope_layers): 12 global + 36
    # chunked; interleave_moe_layer_step 2: 24 MoE layers (num_local_experts 128, top-1, plus a
    # shared expert, intermediate_size 8192) and 24 dense layers (intermediate_size_mlp 16384).
    # The global layers (3, 7, ..., 47) are all MoE layers (1, 3, 5, ...).
    H = 5120
    global_attn = gqa(H, 40, 8, 128, kv_dtype_bytes=2.0)  # the global layers keep BF16 KV
    chunked = gqa(H, 40, 8, 128, window=8192)
    l4_moe = moe(H, 8192, routed=128, top_k=1, shared=1)
    llama4 = Arch("Llama 4 Maverick", H, (
        LayerGroup(12, global_attn, l4_moe),
        LayerGroup(12, chunked, l4_moe),
        LayerGroup(24, chunked, dense(H, 16384)),
    ), "meta-llama/Llama-4-Maverick-17B-128E config.json")

    # baidu/ERNIE-4.5-300B-A47B-PT config.json: hidden_size 8192, num_hidden_layers 54,
    # num_attention_heads 64, num_key_value_heads 8 (head_dim 8192/64 = 128),
    # moe_layer_start_index 3, intermediate_size 28672, moe_num_experts 64, moe_k 8,
    # moe_intermediate_size 3584, no shared expert.
    ernie_attn = gqa(8192, 64, 8, 128)
    ernie = Arch("ERNIE 4.5", 8192, (
        LayerGroup(3, ernie_attn, dense(8192, 28672)),
        LayerGroup(51, ernie_attn, moe(8192, 3584, routed=64, top_k=8)),
    ), "baidu/ERNIE-4.5-300B-A47B-PT config.json")

    # Pangu Pro MoE (72B-A16B) config.json: hidden_size 5120, num_hidden_layers 48,
    # num_attention_heads 40, num_key_value_heads 8, head_dim 128, num_experts 64 in 8 groups,
    # num_experts_per_tok 8 (one per group), num_shared_experts 4, moe_intermediate_size 1344.
    pangu = Arch("Pangu Pro MoE", 5120, (
        LayerGroup(48, gqa(5120, 40, 8, 128), moe(5120, 1344, routed=64, top_k=8, shared=4)),
    ), "Pangu Pro MoE 72B-A16B config.json")

    return deepseek, kimi, qwen_moe, qwen_dense, llama4, _minimax_m1(), ernie, pangu


COMPARISON_MODELS: tuple[Arch, ...] = _comparison_models()

# The order of the paper's tables; Step-3 (derived, see costmodel.step3_arch) comes last.
MODEL_NAMES = tuple(a.name for a in COMPARISON_MODELS) + ("Step-3",)
