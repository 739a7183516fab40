"""The deployment memory plan (``step3-jax plan``): bytes per device for weights, KV cache and
activations, colocated on one mesh or split by AFD, and a cross-check against compiled programs.

The arithmetic always works; it needs no devices and allocates nothing:

* **Weights**: every leaf of ``weights.declare`` at its per-device shard shape. Shard shapes come
  from the rules table (``sharding.param_shardings``) on an abstract mesh of the planned size.
  Colocated: one ``dp x tp x ep`` mesh. AFD, as ``afd.place`` lays it out: every attention
  device holds the embedding, LM head, norms, MFA weights and routers whole (attention is data
  parallel); the FFN devices hold the routed experts, shared experts and dense FFNs, split by
  ``ep``/``tp``. Bytes per format:

  - ``fp8``: the matmul weights (attention projections, routed and shared experts, dense FFNs)
    take 1 byte per value plus one float32 scale per 128x128 block of their matrix (the Hub's
    ``[out, in]``, which is also the declared layout; one grid per stacked expert). A device
    holds the scale blocks of its shard, or all of them when its split does not divide the block grid. The embedding, LM head,
    router and norms stay BF16, as in the paper and the Hub FP8 checkpoint.
  - ``bf16``: 2 bytes everywhere. ``float32``: 4 bytes, which is what the CPU program holds.
* **KV cache**: sequences per device x context x ``kv_elements_per_token`` x bytes per value. An
  FP8 cache is 1 byte per value, i.e. the paper's 512 B per token and layer, with no per-block
  scales. Colocated, a device holds ``ceil(B / dp)`` sequences. With AFD, an attention device
  holds ``m x ceil(ceil(B / m) / A)`` sequences (``m`` micro-batches, as ``afd.generate`` pads
  them) and an FFN device holds none. The cache is updated in place, as the colocated decode
  loop does (its state is donated).
* **Activations**: the live buffers of one decode step (one new token per sequence), in the
  activation dtype (BF16 in a deployment, the compute dtype in the CPU program), plus float32
  where the code computes in float32. We count (see :func:`activations`):

  - the *residual stream* held across layers: ``x`` and ``h``, i.e. ``2 x b x H`` per
    sequence colocated; with AFD, every micro-batch's ``h`` and ``f`` on the attention side;
  - the biggest *layer*:
    - attention: every ``[b, heads, S]`` array the MFA code defines, which are the scores,
      masked scores and exponentials (float32) and the probabilities (activation dtype), plus
      its per-token vectors (low-rank query, heads, output, k, v, o_proj output). XLA:CPU
      materializes two to four of the score arrays; a fused attention kernel, none.
    - the MoE layer, by kernel:
      - ``ragged`` (GPU/TPU, the deployment): the token-expert pairs' gathered inputs, gate/up
        and down outputs, plus the float32 combine buffer and the shared expert's hidden
        activations.
      - ``loop`` (XLA:CPU): one slot of rows, plus the copy XLA:CPU makes of one expert's
        weights when the experts are stacked (``ep > 1``).
    - the dense FFN's hidden activations;
  - or the *LM head and sampling*, if bigger than any layer: over the padded vocabulary in
    float32, the logits, the scaled logits, top-k/top-p filtering's four arrays and the Gumbel
    noise. With AFD an attention device samples all its micro-batches at once (``m x b`` rows).

  Not counted: small index arrays (routing ids, positions, sort permutations), XLA's fusion
  intermediates below the sizes above, the runtime's workspace, and anything a serving system
  adds (CUDA graphs, NCCL buffers, fragmentation).

The compiled check (:func:`compiled_check`) lowers the real programs with abstract
``jax.ShapeDtypeStruct`` inputs carrying their shardings, on that many emulated CPU devices (so
nothing is allocated), and reads ``compiled.memory_analysis()``. Colocated, that is the whole
decode loop (``generate._decode``). With AFD, it is each program the decode step dispatches: the
attention step of a dense and of an MoE layer, the FFN step of each, and the LM head with
sampling (``afd._next_tokens``, on one attention device, as ``afd.generate`` runs it). Each
program's argument bytes are set beside the arithmetic's (the weights of what it takes, its KV,
its inputs) and its temporaries beside the activation estimate. The comparison is like with
like: float32 weights, KV and activations and the ``loop`` kernel, which is what the CPU program
holds. The deployment figures then differ only in bytes per value and in the MoE kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
import time

import jax

from step3_jax.model import quant
from step3_jax.model import weights
from step3_jax.model.cache import layer_shapes
from step3_jax.model.config import Step3Config
from step3_jax.errors import Step3Error
from step3_jax.model.sharding import MESH_AXES, axis_sizes

BYTES = {"fp8": 1, "bf16": 2, "float32": 4}
GPUS_PER_SERVER = 8  # the paper's servers: 2A2F = 16 attention + 16 FFN devices
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# ----- inputs -------------------------------------------------------------------------------------

def parse_bytes(text: str, flag: str = "--device-memory") -> int:
    """``"80GB"`` -> 80e9, ``"80GiB"`` -> 80 * 2**30, ``"1e9"`` -> 1e9 bytes (SI or binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]i?[bB]|[bB])?\s*",
                     str(text))
    if not m or float(m.group(1)) <= 0:
        raise Step3Error(f"{flag} must be a positive size like 80GB, 80GiB or 85899345920, "
                         f"got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the model lives: one colocated mesh, or AFD's attention and FFN groups."""

    dp: int = 1                 # colocated mesh (ignored under AFD)
    tp: int = 1
    ep: int = 1
    afd: bool = False
    attention: int = 0          # AFD: attention devices (data-parallel)
    ffn_ep: int = 1             # AFD: FFN devices = ffn_ep * ffn_tp
    ffn_tp: int = 1
    micro_batches: int = 1

    @property
    def devices(self) -> int:
        if self.afd:
            return self.attention + self.ffn_ep * self.ffn_tp
        return self.dp * self.tp * self.ep

    def describe(self) -> str:
        if not self.afd:
            return f"colocated mesh dp={self.dp},tp={self.tp},ep={self.ep}"
        f = self.ffn_ep * self.ffn_tp
        servers = (f" ({self.attention // GPUS_PER_SERVER}A{f // GPUS_PER_SERVER}F)"
                   if self.attention % GPUS_PER_SERVER == 0 and f % GPUS_PER_SERVER == 0 else "")
        return (f"AFD {self.attention}:{f}{servers}: {self.attention} attention devices "
                f"(data-parallel) + {f} FFN devices (ep={self.ffn_ep}, tp={self.ffn_tp}), "
                f"{self.micro_batches} micro-batches")

    def to_json(self) -> dict:
        if self.afd:
            return {"kind": "afd", "attention_devices": self.attention,
                    "ffn_devices": self.ffn_ep * self.ffn_tp, "ffn_mesh": {"ep": self.ffn_ep,
                                                                       "tp": self.ffn_tp},
                    "micro_batches": self.micro_batches}
        return {"kind": "colocated", "mesh": {"dp": self.dp, "tp": self.tp, "ep": self.ep}}


def parse_placement(afd: str | None = None, mesh: str | None = None, ffn_mesh: str | None = None,
                    micro_batches: int = 3) -> Placement:
    """``--afd A:F`` (devices, as ``generate --afd``; or the paper's ``2A2F``, servers of 8) or
    ``--mesh dp=N,tp=N,ep=N``; neither: one device. A mesh bigger than this machine is fine:
    the plan is for a cluster."""
    if afd and mesh:
        raise Step3Error("--afd and --mesh are exclusive (use --ffn-mesh for the FFN group)")
    if ffn_mesh and not afd:
        raise Step3Error("--ffn-mesh needs --afd")
    if not afd:
        return Placement(**axis_sizes(mesh))
    servers = re.fullmatch(r"\s*(\d+)\s*[aA]\s*(\d+)\s*[fF]\s*", afd)
    if servers:
        afd = f"{int(servers.group(1)) * GPUS_PER_SERVER}:{int(servers.group(2)) * GPUS_PER_SERVER}"
    from step3_jax.runtime.afd import parse_plan

    p = parse_plan(afd, ffn_mesh, micro_batches)
    return Placement(afd=True, attention=p.attention, ffn_ep=p.ffn_ep, ffn_tp=p.ffn_tp,
                     micro_batches=p.micro_batches)


# ----- per-device shards of the declaration -------------------------------------------------------

_NORMS = ("final_norm", "input_norm", "post_norm", "inter_norm")


def _category(keys: list, moe_layer: bool) -> str:
    """What a weight is, from its path in the declaration."""
    name = keys[-1]
    if name in ("embed", "lm_head"):
        return {"embed": "embedding", "lm_head": "lm_head"}[name]
    if name in _NORMS:
        return "norms"
    if "attn" in keys:
        return "mfa_projections"
    if name == "router":
        return "router"
    if "shared" in keys:
        return "shared_expert"
    return "routed_experts" if moe_layer else "dense_ffn"


@dataclasses.dataclass(frozen=True)
class Shard:
    """One weight on one device of its group."""

    group: str           # "attention" or "ffn" (AFD) / "colocated"
    category: str        # embedding, lm_head, norms, mfa_projections, router, routed_experts, ...
    layer: int | None
    spec: weights.WeightSpec
    sharding: jax.sharding.NamedSharding | None  # None: held whole (AFD attention group)

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-device shard shape."""
        if self.sharding is None:
            return self.spec.shape
        return tuple(self.sharding.shard_shape(self.spec.shape))

    def bytes(self, fmt: str) -> tuple[int, int]:
        """``(value bytes, FP8 scale bytes)`` of this shard under weight format ``fmt``. FP8:
        the weights ``quant.is_quantized`` names (the Hub FP8 checkpoint's rule) at 1 byte, with
        their float32 block scales sharded by ``quant.scale_sharding``; the rest BF16."""
        n = math.prod(self.shape)
        if fmt != "fp8":
            return n * BYTES[fmt], 0
        if not quant.is_quantized(self.spec):
            return n * BYTES["bf16"], 0
        grid = quant.scale_grid(quant.matrix_view(self.spec))
        if self.sharding is not None:
            grid = quant.scale_sharding(self.spec, self.sharding).shard_shape(grid)
        return n, 4 * math.prod(grid)


def _abstract_mesh(dp=1, tp=1, ep=1):
    return jax.sharding.AbstractMesh((dp, tp, ep), MESH_AXES)


@functools.lru_cache(maxsize=16)
def shards(cfg: Step3Config, placement: Placement) -> tuple[Shard, ...]:
    """Every weight's per-device shard under ``placement`` (derived from the declaration and the
    rules table; a split that does not divide its axis is a one-line error)."""
    from step3_jax.model.sharding import param_shardings

    decl = weights.declare(cfg)
    if placement.afd:
        ffn_sh = param_shardings(cfg, _abstract_mesh(tp=placement.ffn_tp, ep=placement.ffn_ep))
        colo_sh = None
    else:
        colo_sh = param_shardings(cfg, _abstract_mesh(placement.dp, placement.tp, placement.ep))
        ffn_sh = None
    flat_specs = jax.tree_util.tree_flatten_with_path(decl, is_leaf=weights.is_spec)[0]
    flat_sh = jax.tree.leaves(colo_sh if colo_sh is not None else ffn_sh)
    out = []
    for (path, spec), sharding in zip(flat_specs, flat_sh):
        keys = [getattr(k, "name", getattr(k, "idx", None)) for k in path]
        layer = keys[keys.index("layers") + 1] if "layers" in keys else None
        category = _category(keys, layer is not None and cfg.is_moe(layer))
        if placement.afd:
            on_ffn = category in ("routed_experts", "shared_expert", "dense_ffn")
            group = "ffn" if on_ffn else "attention"
            if not on_ffn:  # afd.place: the attention group holds its weights whole
                sharding = None
        else:
            group = "colocated"
        out.append(Shard(group, category, layer, spec, sharding))
    return tuple(out)


def weight_bytes(items, fmt: str) -> dict:
    """Bytes per category (and ``fp8_scales``, ``total``) of ``items`` under format ``fmt``."""
    out: dict[str, int] = {}
    scales = 0
    for s in items:
        values, sc = s.bytes(fmt)
        out[s.category] = out.get(s.category, 0) + values
        scales += sc
    if fmt == "fp8":
        out["fp8_scales"] = scales
    out["total"] = sum(out.values())
    return out


# ----- activations --------------------------------------------------------------------------------

def _local(n: int, split: int) -> int:
    return n // split if split > 1 and n % split == 0 else n


def attention_layer_bytes(cfg: Step3Config, b: int, heads: int, context: int, act: int) -> int:
    """One MFA layer's live buffers for ``b`` new tokens over ``context`` cached positions."""
    Q, d, H = cfg.share_q_dim, cfg.head_dim, cfg.hidden_size
    scores = b * heads * context * (3 * 4 + act)   # scores, masked, exp (f32); probabilities
    vectors = b * (Q + 2 * heads * d + 2 * d + H) * act
    return scores + vectors


def router_bytes(cfg: Step3Config, tokens: int) -> int:
    return 2 * tokens * cfg.moe_num_experts * 4 if cfg.moe_layers else 0  # logits, probs (f32)


def moe_layer_bytes(cfg: Step3Config, tokens: int, *, ep: int, tp: int, act: int, kernel: str,
                    weight_bytes_per_value: int) -> int:
    """One MoE layer's live buffers on one device for ``tokens`` tokens (routed + shared)."""
    if not cfg.moe_layers:
        return 0
    H, k = cfg.hidden_size, cfg.moe_top_k
    fe, fs = _local(cfg.moe_intermediate_size, tp), _local(cfg.share_expert_dim, tp)
    combine = tokens * H * 4                    # the float32 accumulator of routed outputs
    shared = 2 * tokens * fs * act              # the shared expert's gate and up outputs
    if kernel == "ragged":                      # every token-expert pair, gathered and grouped
        pairs = tokens * k
        routed = pairs * (2 * H + 2 * fe) * act
    else:                                       # XLA:CPU loop: one slot of rows at a time
        from step3_jax.model.moe import slot_rows

        rows = slot_rows(tokens, cfg)
        routed = rows * (2 * H + 2 * fe) * act
        if ep > 1:                              # stacked experts: one expert's weights copied
            routed += 3 * H * fe * weight_bytes_per_value
    return combine + shared + routed + tokens * H * act  # + the layer's output


def dense_layer_bytes(cfg: Step3Config, tokens: int, *, tp: int, act: int) -> int:
    if len(cfg.moe_layers) == cfg.num_hidden_layers:
        return 0
    return tokens * (2 * _local(cfg.intermediate_size, tp) + cfg.hidden_size) * act


def head_bytes(cfg: Step3Config, b: int, act: int) -> int:
    """The normed hidden state, then over the padded vocabulary in float32: the logits, the
    scaled logits, top-k/top-p filtering's sorted copy, probabilities, running sum and filtered
    logits, and the Gumbel noise (``sampling.sample`` with a filter on: its largest case)."""
    return b * cfg.hidden_size * act + 7 * b * cfg.padded_vocab * 4


def activations(cfg: Step3Config, placement: Placement, batch: int, context: int, *,
                act: int, kernel: str, weight_bytes_per_value: int) -> dict:
    """Live activation bytes per device of one decode step: ``{group: {part: bytes}}``."""
    H = cfg.hidden_size
    if not placement.afd:
        b = -(-batch // placement.dp)
        heads = _local(cfg.num_attention_heads, placement.tp)
        layer = {
            "attention_layer": attention_layer_bytes(cfg, b, heads, context, act),
            "moe_layer": router_bytes(cfg, b) + moe_layer_bytes(
                cfg, b, ep=placement.ep, tp=placement.tp, act=act, kernel=kernel,
                weight_bytes_per_value=weight_bytes_per_value),
            "dense_layer": dense_layer_bytes(cfg, b, tp=placement.tp, act=act),
            "lm_head_and_sampling": head_bytes(cfg, b, act),
        }
        return {"colocated": _peak({"residual_stream": 2 * b * H * act}, layer)}
    m = placement.micro_batches
    rows = -(-(-(-batch // m)) // placement.attention) * placement.attention  # per micro-batch
    b = rows // placement.attention            # tokens per attention device per micro-batch
    transfer = b * (H + 4)                     # FP8 y and one float32 scale per token
    attn = {
        "attention_layer": attention_layer_bytes(cfg, b, cfg.num_attention_heads, context, act)
        + router_bytes(cfg, b) + transfer,
        "lm_head_and_sampling": head_bytes(cfg, m * b, act),  # all micro-batches at once
    }
    inputs = rows * (H + 4 + 8 * cfg.moe_top_k) + rows * H * act  # received, dequantized
    ffn = {
        "moe_layer": moe_layer_bytes(cfg, rows, ep=placement.ffn_ep, tp=placement.ffn_tp,
                                     act=act, kernel=kernel,
                                     weight_bytes_per_value=weight_bytes_per_value),
        "dense_layer": dense_layer_bytes(cfg, rows, tp=placement.ffn_tp, act=act),
    }
    return {"attention": _peak({"residual_stream": m * 2 * b * H * act}, attn),
            "ffn": _peak({"received_tokens": inputs}, ffn)}


def _peak(held: dict, phases: dict) -> dict:
    """Buffers held throughout plus the largest phase (layers run one at a time)."""
    biggest = max(phases, key=phases.get)
    return {**held, **phases, "peak_phase": biggest,
            "total": sum(held.values()) + phases[biggest]}


# ----- the plan -----------------------------------------------------------------------------------

def sequences_per_device(placement: Placement, batch: int) -> int:
    if not placement.afd:
        return -(-batch // placement.dp)
    m = placement.micro_batches
    return m * (-(-(-(-batch // m)) // placement.attention))


def _check(batch: int, context: int, cfg: Step3Config, fmt: str, kv_dtype: str):
    if batch < 1:
        raise Step3Error(f"--batch must be >= 1, got {batch}")
    if context < 1:
        raise Step3Error(f"--context must be >= 1, got {context}")
    if context > cfg.max_position_embedding:
        raise Step3Error(f"--context {context} exceeds the model's context "
                         f"(max_position_embedding={cfg.max_position_embedding})")
    if fmt not in BYTES:
        raise Step3Error(f"--weights must be fp8 or bf16, got {fmt!r}")
    if kv_dtype not in BYTES:
        raise Step3Error(f"--kv-dtype must be fp8 or bf16, got {kv_dtype!r}")


def plan(cfg: Step3Config, placement: Placement, *, batch: int, context: int,
         weights_format: str = "fp8", kv_dtype: str = "fp8", act_dtype: str = "bf16",
         moe_kernel: str = "ragged", device_memory: int = 80 * 10**9) -> dict:
    """The memory plan as the ``step3-jax plan --json`` document (without ``compiled``)."""
    _check(batch, context, cfg, weights_format, kv_dtype)
    items = shards(cfg, placement)
    act = BYTES[act_dtype]
    w_value = BYTES["bf16" if weights_format == "fp8" else weights_format]
    acts = activations(cfg, placement, batch, context, act=act, kernel=moe_kernel,
                       weight_bytes_per_value=1 if weights_format == "fp8" else w_value)
    seqs = sequences_per_device(placement, batch)
    kv = seqs * context * cfg.kv_elements_per_token * BYTES[kv_dtype]
    groups = ("attention", "ffn") if placement.afd else ("colocated",)
    breakdown = {}
    for g in groups:
        w = weight_bytes([s for s in items if s.group == g], weights_format)
        kv_g = 0 if g == "ffn" else kv
        devices = (placement.attention if g == "attention" else
                   placement.ffn_ep * placement.ffn_tp if g == "ffn" else placement.devices)
        breakdown[g] = {"devices": devices,
                        "sequences_per_device": 0 if g == "ffn" else seqs,
                        "weights": w, "kv_cache": kv_g, "activations": acts[g],
                        "total": w["total"] + kv_g + acts[g]["total"]}
    if placement.afd:
        a_bytes, f_bytes = breakdown["attention"]["total"], breakdown["ffn"]["total"]
    else:
        a_bytes = f_bytes = breakdown["colocated"]["total"]
    return {
        "config": cfg.name,
        "placement": placement.to_json(),
        "batch": batch,
        "context": context,
        "weights": weights_format,
        "kv_dtype": kv_dtype,
        "activation_dtype": act_dtype,
        "moe_kernel": moe_kernel,
        "attention_device_bytes": a_bytes,
        "ffn_device_bytes": f_bytes,
        "device_memory_bytes": device_memory,
        "fits": max(a_bytes, f_bytes) <= device_memory,
        "breakdown": breakdown,
    }


def max_batch(cfg: Step3Config, placement: Placement, *, context: int, device_memory: int,
              **kw) -> int:
    """The largest batch whose plan fits ``device_memory`` at ``context`` (0: none fits)."""
    def fits(b):
        return plan(cfg, placement, batch=b, context=context, device_memory=device_memory,
                    **kw)["fits"]

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def notes(cfg: Step3Config, placement: Placement, doc: dict) -> list[str]:
    """What the figures assume, in one line each (also in the JSON's ``notes``)."""
    out = [
        "Activations: the residual stream held across layers plus the largest of one attention "
        "layer (every [tokens, heads, context] array the MFA code defines: scores, masked scores "
        "and exponentials in float32, probabilities), one FFN layer (" + doc["moe_kernel"] +
        " MoE kernel) and the LM head with sampling. A fused attention kernel would not "
        "materialize the score arrays (step3_jax/plan.py).",
        "GB = 1e9 bytes. --device-memory 80GB is 80e9 bytes: conservative for an 80 GB Hopper "
        "card, whose 80 GiB (85.9e9 B) of HBM include what the runtime reserves.",
    ]
    if doc["weights"] == "fp8":
        out.append("FP8 weights: 1 byte per value plus a float32 scale per 128x128 block; the "
                   "embedding, LM head, router and norms stay BF16.")
    if doc["kv_dtype"] == "fp8":
        out.append("FP8 KV cache: 1 byte per value (512 B per token and layer for Step-3), no "
                   "scales counted.")
    if placement.afd:
        kv = doc["breakdown"]["attention"]["kv_cache"]
        out.append(f"The KV cache ({kv / 1e9:.2f} GB per attention device) is updated in "
                   f"place: the colocated decode loop donates its state, afd.generate donates "
                   f"each layer's cache to its attention step.")
        w = doc["breakdown"]["ffn"]["weights"]
        whole = w.get("shared_expert", 0) + w.get("dense_ffn", 0)
        if placement.ffn_tp == 1 and whole:
            out.append(f"The FFN group splits the routed experts by ep; shared experts and dense "
                       f"FFNs are split only by tp, so with tp=1 every FFN device holds all of "
                       f"them ({whole / 1e9:.2f} GB).")
        out.append("Every attention device holds the embedding, LM head, norms, MFA weights and "
                   "routers whole: attention is data-parallel (afd.place, paper section 2).")
    return [" ".join(n.split()) for n in out]


# Above this many per-expert branches (MoE layers x experts) the colocated check's CPU loop kernel
# compiles for minutes (one switch branch per expert: ~6 s per 48-expert layer measured here), so
# --compiled-check auto skips it; ep > 1 (stacked experts) compiles in seconds at any size.
MAX_AUTO_EXPERT_BRANCHES = 256
COMPILED_CHECK_MODES = ("auto", "on", "off")


def _skip_reason(cfg: Step3Config, placement: Placement) -> str | None:
    from step3_jax.model.moe import resolve_impl

    branches = len(cfg.moe_layers) * cfg.moe_num_experts
    if (not placement.afd and placement.ep == 1 and resolve_impl(cfg.replace(dtype="float32"))
            == "loop" and branches > MAX_AUTO_EXPERT_BRANCHES):
        return (f"a colocated mesh with ep=1 compiles the CPU loop kernel's {branches} "
                f"per-expert branches (minutes); use --compiled-check on to force it, or ep > 1")
    return None


def run(cfg: Step3Config, placement: Placement, *, batch: int, context: int,
        weights_format: str, kv_dtype: str, device_memory: int, compiled: str = "auto",
        log=None) -> dict:
    """The ``step3-jax plan --json`` document: the plan, the largest batch that fits, notes and
    (unless ``compiled="off"``) the compiled check, in this process when it has enough devices,
    else in a child process with that many emulated CPU devices."""
    if compiled not in COMPILED_CHECK_MODES:
        raise Step3Error(f"--compiled-check must be one of {', '.join(COMPILED_CHECK_MODES)}")
    kw = dict(weights_format=weights_format, kv_dtype=kv_dtype)
    doc = plan(cfg, placement, batch=batch, context=context, device_memory=device_memory, **kw)
    doc["max_batch"] = max_batch(cfg, placement, context=context, device_memory=device_memory,
                                 **kw)
    doc["notes"] = notes(cfg, placement, doc)
    reason = _skip_reason(cfg, placement) if compiled == "auto" else None
    if compiled == "off":
        doc["compiled"] = None
    elif reason:
        doc["compiled"] = {"skipped": reason}
    else:
        here = len(jax.devices()) >= placement.devices
        if log:
            log(f"compiled check: {placement.devices} emulated devices "
                f"({'this process' if here else 'a child process'})")
        fn = compiled_check if here else compiled_check_subprocess
        doc["compiled"] = fn(cfg, placement, batch=batch, context=context)
    return doc


# ----- the compiled check -------------------------------------------------------------------------

def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _stats(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
            "aliased": int(m.alias_size_in_bytes), "temps": int(m.temp_size_in_bytes)}


def _abstract_layout(tree, cfg: Step3Config, ep: int):
    """Abstract params in the MoE kernel's runtime layout (per-expert on the CPU loop kernel with
    ``ep == 1``, as ``checkpoint.load`` hands them over)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from step3_jax.model.moe import resolve_impl

    if not (resolve_impl(cfg) == "loop" and ep == 1):
        return tree

    def unstack(w):
        spec = tuple(w.sharding.spec) + (None,) * (len(w.shape) - len(w.sharding.spec))
        sh = NamedSharding(w.sharding.mesh, P(*spec[1:]))
        return tuple(_sds(w.shape[1:], w.dtype, sh) for _ in range(w.shape[0]))

    def one(ffn):
        if isinstance(ffn, weights.Moe):
            return ffn.replace(gate=unstack(ffn.gate), up=unstack(ffn.up), down=unstack(ffn.down))
        return ffn

    if isinstance(tree, weights.Params):
        return tree.replace(layers=tuple(layer.replace(ffn=one(layer.ffn))
                                         for layer in tree.layers))
    return one(tree)


def _program(name, group, compiled, predicted_args, predicted_temps) -> dict:
    st = _stats(compiled)
    return {"program": name, "group": group, "compiled": st,
            "plan": {"arguments": predicted_args, "temps": predicted_temps},
            "arguments_ratio": st["arguments"] / predicted_args if predicted_args else None,
            "temps_ratio": st["temps"] / predicted_temps if predicted_temps else None}


def _colocated_programs(cfg, placement, batch, context, devices) -> list[dict]:
    import functools
    import importlib

    import jax.numpy as jnp

    from step3_jax.model.cache import K_AXES, V_AXES, KVCache
    from step3_jax.model.sharding import make_mesh, named, param_shardings, replicated

    gen = importlib.import_module("step3_jax.runtime.generate")  # the package exports a function of
    mesh = make_mesh(placement.dp, placement.tp, placement.ep, devices=devices)  # that name
    dt = jnp.dtype(cfg.dtype)
    params = _abstract_layout(weights.abstract_params(cfg, param_shardings(cfg, mesh)), cfg,
                              placement.ep)
    B = -(-batch // placement.dp) * placement.dp     # generate pads the batch to dp
    per, rep = named(mesh, ("batch",)), replicated(mesh)
    layers = range(cfg.num_hidden_layers)
    k_shape, v_shape = layer_shapes(cfg, B, context)
    cache = KVCache(k=tuple(_sds(k_shape, dt, named(mesh, K_AXES)) for _ in layers),
                    v=tuple(_sds(v_shape, dt, named(mesh, V_AXES)) for _ in layers),
                    lengths=_sds((B,), jnp.int32, per))
    state = gen._LoopState(step=_sds((), jnp.int32, rep), token=_sds((B,), jnp.int32, per),
                           done=_sds((B,), jnp.bool_, per), reason=_sds((B,), jnp.int32, per),
                           n_gen=_sds((B,), jnp.int32, per),
                           out=_sds((B, context), jnp.int32, named(mesh, ("batch", "seq"))),
                           cache=cache)
    key = jax.random.key_data(jax.random.PRNGKey(0))
    knobs = (_sds((B,) + key.shape, key.dtype, per), _sds((B,), jnp.int32, per),
             _sds((1,), jnp.int32, rep), _sds((), jnp.float32, rep), _sds((), jnp.int32, rep),
             _sds((), jnp.float32, rep))
    shard = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
    fn = jax.jit(functools.partial(gen._decode, cfg=cfg),
                 in_shardings=(shard(params), shard(state), *shard(knobs)),
                 out_shardings=shard(state), donate_argnums=(1,))
    with jax.set_mesh(mesh):
        compiled = fn.lower(params, state, *knobs).compile()
    # The arithmetic's prediction for the same program, in the dtype it holds.
    p = plan(cfg, placement, batch=batch, context=context, weights_format="float32",
             kv_dtype="float32", act_dtype="float32", moe_kernel="loop")["breakdown"]["colocated"]
    b = B // placement.dp
    key_bytes = math.prod(key.shape) * key.dtype.itemsize
    state_bytes = 4 + b * (4 + 1 + 4 + 4 + 4 * context + 4)        # step..out, lengths
    knob_bytes = b * (key_bytes + 4) + 4 + 4 + 4 + 4                 # keys, budget, eos, knobs
    args = p["weights"]["total"] + p["kv_cache"] + state_bytes + knob_bytes
    temps = p["activations"]["total"]
    return [_program("decode loop (generate._decode)", "colocated", compiled, args, temps)]


def _afd_programs(cfg, placement, batch, context, devices) -> list[dict]:
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

    from step3_jax.runtime import afd
    from step3_jax.model.sharding import make_mesh, param_shardings

    A = placement.attention
    F = placement.ffn_ep * placement.ffn_tp
    attn_mesh = make_mesh(dp=A, devices=devices[:A])
    ffn_mesh = make_mesh(ep=placement.ffn_ep, tp=placement.ffn_tp, devices=devices[A:A + F])
    dt = jnp.dtype(cfg.dtype)
    item = dt.itemsize
    rep_a, rep_f = NamedSharding(attn_mesh, P()), NamedSharding(ffn_mesh, P())
    dp = NamedSharding(attn_mesh, P("dp"))
    m = placement.micro_batches
    rows = -(-(-(-batch // m)) // A) * A
    b = rows // A
    H, d, k = cfg.hidden_size, cfg.head_dim, cfg.moe_top_k
    decl = weights.declare(cfg)
    ffn_sh = param_shardings(cfg, ffn_mesh)
    items = shards(cfg, placement)
    acts = activations(cfg, placement, batch, context, act=item, kernel="loop",
                       weight_bytes_per_value=item)

    def layer_weights(group, i):
        return sum(s.bytes("float32")[0] for s in items if s.group == group and s.layer == i)

    out = []
    kinds = [("MoE", cfg.moe_layers[0])] if cfg.moe_layers else []
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe(i)]
    kinds += [("dense", dense[0])] if dense else []
    for kind, i in kinds:
        spec = decl.layers[i]
        layer = jax.tree.map(lambda s: _sds(s.shape, dt, rep_a), spec, is_leaf=weights.is_spec)
        layer = layer.replace(ffn=afd._RouterOnly(layer.ffn.router) if kind == "MoE" else None)
        h = _sds((rows, 1, H), dt, dp)
        k_shape, v_shape = layer_shapes(cfg, rows, context)
        kv = (_sds(k_shape, dt, dp), _sds(v_shape, dt, dp),
              _sds((rows, 1), jnp.int32, dp), _sds((rows,), jnp.int32, dp))
        compiled = afd._attention_step.lower(layer, h, h, _sds((rows, 1), jnp.int32, dp), *kv,
                                             cfg=cfg, transfer="float8_e4m3fn").compile()
        args = (layer_weights("attention", i) + 2 * b * H * item + b * 4
                + 2 * b * context * d * item + b * 4 + b * 4)
        temps = (attention_layer_bytes(cfg, b, cfg.num_attention_heads, context, item)
                 + (router_bytes(cfg, b) if kind == "MoE" else 0) + b * (H + 4))
        out.append(_program(f"attention step ({kind} layer {i})", "attention", compiled, args,
                            temps))

        ffn = jax.tree.map(lambda s, sh: _sds(s.shape, dt, sh), spec.ffn, ffn_sh.layers[i].ffn,
                           is_leaf=weights.is_spec)
        if kind == "MoE":
            ffn = _abstract_layout(ffn.replace(router=None), cfg, placement.ffn_ep)
            routing = (_sds((rows, 1, k), jnp.float32, rep_f),
                       _sds((rows, 1, k), jnp.int32, rep_f))
        else:
            routing = None
        q = _sds((rows, 1, H), jnp.float8_e4m3fn, rep_f)
        scale = _sds((rows, 1, 1), jnp.float32, rep_f)
        with jax.set_mesh(ffn_mesh):
            compiled = afd._ffn_step.lower(ffn, ((q, scale, routing),), cfg=cfg).compile()
        args = layer_weights("ffn", i) + rows * (H + 4) + (rows * k * 8 if kind == "MoE" else 0)
        temps = acts["ffn"]["moe_layer" if kind == "MoE" else "dense_layer"] + rows * H * item
        out.append(_program(f"FFN step ({kind} layer {i})", "ffn", compiled, args, temps))

    # The LM head and sampling: one program per attention device over all its micro-batches'
    # rows, on that device alone, as afd.generate runs it.
    one = SingleDeviceSharding(devices[0])
    head = decl.replace(layers=())
    head = jax.tree.map(lambda s: _sds(s.shape, dt, one), head, is_leaf=weights.is_spec)
    hs = tuple(_sds((b, 1, H), dt, one) for _ in range(m))
    key = jax.random.key_data(jax.random.PRNGKey(0))
    keys = _sds((m * b,) + key.shape, key.dtype, one)
    knobs = [_sds((), t, one) for t in (jnp.int32, jnp.float32, jnp.int32, jnp.float32)]
    compiled = afd._next_tokens.lower(head, hs, hs, _sds((m * b,), jnp.int32, one), keys,
                                      *knobs, cfg=cfg).compile()
    lm = [s for s in items if s.category in ("lm_head",) or s.spec.hub == "model.norm.weight"]
    if cfg.tie_word_embeddings:
        lm = [s for s in items if s.category == "embedding" or s.spec.hub == "model.norm.weight"]
    args = (sum(s.bytes("float32")[0] for s in lm) + 2 * m * b * H * item
            + m * b * (4 + key.size * key.dtype.itemsize) + 4 * 4)  # at, keys; step and knobs
    temps = head_bytes(cfg, m * b, item)
    out.append(_program("LM head and sampling (afd._next_tokens)", "attention", compiled, args,
                        temps))
    return out


def compiled_check(cfg: Step3Config, placement: Placement, *, batch: int,
                   context: int) -> dict:
    """Lower and compile the real decode programs on emulated devices, with abstract inputs, and
    set each one's memory analysis beside the arithmetic (float32, the ``loop`` kernel). Needs
    ``placement.devices`` devices in this process (:func:`compiled_check_subprocess` otherwise)."""
    cfg = cfg.replace(dtype="float32")
    devices = jax.devices()
    if len(devices) < placement.devices:
        raise Step3Error(f"the compiled check needs {placement.devices} devices, this process "
                         f"has {len(devices)}")
    start = time.perf_counter()
    fn = _afd_programs if placement.afd else _colocated_programs
    programs = fn(cfg, placement, batch, context, devices[: placement.devices])
    return {"devices": placement.devices, "backend": jax.default_backend(), "dtype": "float32",
            "moe_kernel": "loop", "programs": programs,
            "seconds": round(time.perf_counter() - start, 2)}


def compiled_check_subprocess(cfg: Step3Config, placement: Placement, *, batch: int,
                              context: int, timeout: float = 1800) -> dict:
    """:func:`compiled_check` in a child Python started with that many emulated CPU devices
    (``XLA_FLAGS=--xla_force_host_platform_device_count=N``): the count is fixed when JAX starts."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={placement.devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    request = json.dumps({"config": _config_json(cfg), "placement": dataclasses.asdict(placement),
                          "batch": batch, "context": context})
    proc = subprocess.run([sys.executable, "-m", "step3_jax.analysis.plan"], input=request, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Step3Error(f"the compiled check failed in its child process: {tail}")
    return json.loads(proc.stdout)


def _config_json(cfg: Step3Config) -> dict:
    return dataclasses.asdict(cfg)


def _config_from_json(raw: dict) -> Step3Config:
    return Step3Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def _child_main() -> int:
    """``python -m step3_jax.plan``: the compiled check on this process's devices; JSON in on
    stdin, JSON out on stdout (used by :func:`compiled_check_subprocess`)."""
    request = json.loads(sys.stdin.read())
    cfg = _config_from_json(request["config"])
    placement = Placement(**request["placement"])
    out = compiled_check(cfg, placement, batch=request["batch"], context=request["context"])
    json.dump(out, sys.stdout)
    return 0


# ----- presentation -------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_plan(doc: dict) -> str:
    """The human-readable ``step3-jax plan`` output."""
    groups = list(doc["breakdown"])
    bd = doc["breakdown"]
    placement = Placement(**_placement_fields(doc["placement"]))
    lines = [f"{doc['config']} on {placement.describe()}",
             f"batch {doc['batch']:,} at context {doc['context']:,}; weights "
             f"{doc['weights'].upper()}, KV {doc['kv_dtype'].upper()}, activations "
             f"{doc['activation_dtype'].upper()}, MoE kernel {doc['moe_kernel']}",
             ""]
    width = 14
    head = f"{'per device (GB)':<28}" + "".join(f"{g:>{width}}" for g in groups)
    lines.append(head)

    def row(label, get):
        cells = []
        for g in groups:
            v = get(bd[g])
            cells.append(f"{'-' if v is None else _gb(v):>{width}}")
        lines.append(f"{label:<28}" + "".join(cells))

    row("weights", lambda x: x["weights"]["total"])
    cats = []
    for g in groups:
        cats += [c for c in bd[g]["weights"] if c != "total" and c not in cats]
    for c in cats:
        row(f"  {c.replace('_', ' ')}", lambda x, c=c: x["weights"].get(c))
    row("KV cache", lambda x: x["kv_cache"] or None)
    row("activations (peak)", lambda x: x["activations"]["total"])
    row("total", lambda x: x["total"])
    lines.append(f"{'sequences per device':<28}" + "".join(
        f"{bd[g]['sequences_per_device'] or '-':>{width}}" for g in groups))
    mem = doc["device_memory_bytes"]
    use = ", ".join(f"{g} {100 * bd[g]['total'] / mem:.0f}%" for g in groups)
    lines += ["", f"device memory {_gb(mem)} GB: {'fits' if doc['fits'] else 'does NOT fit'} "
              f"({use} full)"]
    if "max_batch" in doc:
        lines.append(f"largest batch that fits at context {doc['context']:,}: "
                     f"{doc['max_batch']:,}")
    c = doc.get("compiled")
    if c is None:
        pass
    elif "skipped" in c:
        lines += ["", f"compiled check skipped: {c['skipped']}"]
    else:
        w = max(len(p["program"]) for p in c["programs"])
        lines += ["", f"compiled check ({c['devices']} emulated {c['backend']} devices, "
                      f"{c['dtype']} weights/KV/activations, {c['moe_kernel']} MoE kernel, "
                      f"{c['seconds']:.1f} s): bytes per device, compiled / plan",
                  f"{'program':<{w}}{'arguments':>22}{'ratio':>7}{'temps':>22}{'ratio':>7}"]
        for p in c["programs"]:
            comp, pl = p["compiled"], p["plan"]
            lines.append(
                f"{p['program']:<{w}}"
                f"{_gb(comp['arguments']) + ' / ' + _gb(pl['arguments']):>22}"
                f"{p['arguments_ratio']:>7.3f}"
                f"{_gb(comp['temps']) + ' / ' + _gb(pl['temps']):>22}"
                f"{p['temps_ratio']:>7.3f}")
    if doc.get("notes"):
        lines += ["", "Notes:"] + [f"  - {n}" for n in doc["notes"]]
    return "\n".join(lines)


def _placement_fields(pj: dict) -> dict:
    if pj["kind"] == "afd":
        return {"afd": True, "attention": pj["attention_devices"], "ffn_ep": pj["ffn_mesh"]["ep"],
                "ffn_tp": pj["ffn_mesh"]["tp"], "micro_batches": pj["micro_batches"]}
    return dict(pj["mesh"])


if __name__ == "__main__":
    sys.exit(_child_main())
