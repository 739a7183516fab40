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
  loop does (its state is donated). Step-3.5's colocated cache is also split over ``tp`` by
  its K/V heads (``sharding.STEP35_CACHE_AXES``); Step-3's single K/V head is not.
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
      Step-3.5 (GQA, :func:`gqa_attention_layer_bytes`): the same score arrays over the keys
      each layer reads (every position on a full layer, the last ``sliding_window`` on a
      sliding one), the largest layer of either kind, plus the keys and values it attends
      over: ``step35_layers.attention`` concatenates the layer's cache with the chunk's own
      K/V, a copy of that layer's cache in the activation dtype.
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

Step-3.5 (``step35-flash``): the same plan from its own declaration (``model.family``), with
its KV cache from ``Step35Config.kv_elements`` (12 full layers keep every position, 33 sliding
layers their last 512), its router and router bias on the attention side under AFD, its GQA
attention layers above, and the assumptions that are Step-3.5's own in :func:`notes`.

The compiled check (:mod:`step3_jax.analysis.compiled`, Step-3 only) lowers the real programs with abstract
inputs on that many emulated CPU devices and sets XLA's memory analysis beside these figures.
Placement and per-device weight shards: :mod:`step3_jax.analysis.deployment`.
"""

from __future__ import annotations

from step3_jax.analysis.deployment import BYTES, Placement, shards, weight_bytes
from step3_jax.errors import Step3Error
from step3_jax.model import attention, family
from step3_jax.model.blocked_attention import blocked_working_set_bytes
from step3_jax.model.config import Step3Config

# ----- activations --------------------------------------------------------------------------------

def _local(n: int, split: int) -> int:
    return n // split if split > 1 and n % split == 0 else n


def attention_layer_bytes(cfg: Step3Config, b: int, heads: int, context: int, act: int,
                          queries: int = 1) -> int:
    """One MFA layer's live buffers for ``b`` sequences of ``queries`` new tokens each over
    ``context`` key slots: the kernel's score buffers — every score array of the plain product
    (scores, masked scores, exponentials in float32, probabilities), or the blocked kernel's
    working set, whichever ``attention.resolve_impl`` picks for these shapes — plus the
    per-token vectors (low-rank query, heads, k, v, output, o_proj output)."""
    Q, d, H = cfg.share_q_dim, cfg.head_dim, cfg.hidden_size
    if attention.resolve_impl(cfg, b, queries, heads, context) == "blocked":
        scores = blocked_working_set_bytes(b, queries, heads, d, context, itemsize=act)
    else:
        scores = b * queries * heads * context * (3 * 4 + act)
    vectors = b * queries * (Q + 2 * heads * d + 2 * d + H) * act
    return scores + vectors


def gqa_attention_layer_bytes(cfg, spec, b: int, tp: int, context: int, act: int,
                              queries: int = 1) -> int:
    """One Step-3.5 attention layer's live buffers (``step35_layers.attention``, the plain
    product) on a device holding ``1/tp`` of the heads, for ``b`` sequences of ``queries`` new
    tokens each at ``context``: the layer attends over ``S = kv_positions + queries`` keys; its
    concatenated keys and values ``[b, S, G/tp, d]`` (activation dtype), the score arrays
    ``[b, queries, n/tp, S]`` (scores, masked scores, exponentials in float32, probabilities),
    and the per-token vectors (q, k, v, the head gate, the heads' output, o_proj output)."""
    n, G, d, H = _local(spec.q_heads, tp), _local(spec.kv_heads, tp), spec.head_dim, cfg.hidden_size
    keys = cfg.kv_positions(spec.index, context) + queries
    kv = 2 * b * keys * G * d * act
    scores = b * queries * n * keys * (3 * 4 + act)
    vectors = b * queries * (2 * n * d + 2 * G * d + n + H) * act
    return kv + scores + vectors


def _attention_layer(cfg, b: int, tp: int, context: int, act: int, queries: int) -> int:
    """The biggest attention layer's buffers, either family (``tp``: the split of the heads)."""
    if family.is_step35(cfg):
        return max(gqa_attention_layer_bytes(cfg, s, b, tp, context, act, queries)
                   for s in cfg.layers)
    return attention_layer_bytes(cfg, b, _local(cfg.num_attention_heads, tp), context, act,
                                 queries)


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
                act: int, kernel: str, weight_bytes_per_value: int, queries: int = 1) -> dict:
    """Live activation bytes per device of one decode step (``queries`` 1), or of one prefill
    pass of ``queries`` tokens per sequence over ``context`` key slots (the LM head then reads
    each sequence's last token only): ``{group: {part: bytes}}``."""
    H = cfg.hidden_size
    if not placement.afd:
        b = -(-batch // placement.dp)
        n = b * queries
        layer = {
            "attention_layer": _attention_layer(cfg, b, placement.tp, context, act, queries),
            "moe_layer": router_bytes(cfg, n) + moe_layer_bytes(
                cfg, n, ep=placement.ep, tp=placement.tp, act=act, kernel=kernel,
                weight_bytes_per_value=weight_bytes_per_value),
            "dense_layer": dense_layer_bytes(cfg, n, tp=placement.tp, act=act),
            "lm_head_and_sampling": head_bytes(cfg, b, act),
        }
        return {"colocated": _peak({"residual_stream": 2 * n * H * act}, layer)}
    m = placement.micro_batches
    seqs = -(-(-(-batch // m)) // placement.attention) * placement.attention  # per micro-batch
    b = seqs // placement.attention            # sequences per attention device and micro-batch
    rows = seqs * queries                      # tokens per micro-batch
    transfer = b * queries * (H + 4)           # FP8 y and one float32 scale per token
    attn = {
        "attention_layer": _attention_layer(cfg, b, 1, context, act, queries)
        + router_bytes(cfg, b * queries) + transfer,
        "lm_head_and_sampling": head_bytes(cfg, m * b, act),  # all micro-batches at once
    }
    inputs = rows * (H + 4 + 8 * cfg.moe_top_k) + rows * H * act  # received, dequantized
    ffn = {
        "moe_layer": moe_layer_bytes(cfg, rows, ep=placement.ffn_ep, tp=placement.ffn_tp,
                                     act=act, kernel=kernel,
                                     weight_bytes_per_value=weight_bytes_per_value),
        "dense_layer": dense_layer_bytes(cfg, rows, tp=placement.ffn_tp, act=act),
    }
    return {"attention": _peak({"residual_stream": m * 2 * b * queries * H * act}, attn),
            "ffn": _peak({"received_tokens": inputs}, ffn)}


def _peak(held: dict, phases: dict) -> dict:
    """Buffers held throughout plus the largest phase (layers run one at a time)."""
    biggest = max(phases, key=phases.get)
    return {**held, **phases, "peak_phase": biggest,
            "total": sum(held.values()) + phases[biggest]}

# ----- the plan -----------------------------------------------------------------------------------

def kv_elements(cfg, context: int) -> int:
    """K and V values one sequence of ``context`` tokens holds: Step-3's every layer at every
    position; Step-3.5's full layers at every position, its sliding layers at the last
    ``sliding_window`` (``Step35Config.kv_elements``)."""
    if family.is_step35(cfg):
        return cfg.kv_elements(context)
    return context * cfg.kv_elements_per_token


def kv_head_split(cfg, placement: Placement) -> int:
    """How many devices share one sequence's KV cache: Step-3.5's K/V heads over a colocated
    ``tp`` (``check_mesh`` made it divide them); Step-3's one K/V head and AFD's data-parallel
    attention: 1."""
    return placement.tp if family.is_step35(cfg) and not placement.afd else 1


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
    key = "max_position_embeddings" if family.is_step35(cfg) else "max_position_embedding"
    if context > getattr(cfg, key):
        raise Step3Error(f"--context {context} exceeds the model's context "
                         f"({key}={getattr(cfg, key)})")
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
    kv = seqs * kv_elements(cfg, context) * BYTES[kv_dtype] // kv_head_split(cfg, placement)
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
        "family": family.of(cfg).label,
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


def document(cfg, placement: Placement, *, batch: int, context: int, weights_format: str,
             kv_dtype: str, device_memory: int) -> dict:
    """The plan, the largest batch that fits and the notes: the ``step3-jax plan --json``
    document without its compiled check (``compiled.plan_document`` adds it for Step-3)."""
    kw = dict(weights_format=weights_format, kv_dtype=kv_dtype)
    doc = plan(cfg, placement, batch=batch, context=context, device_memory=device_memory, **kw)
    doc["max_batch"] = max_batch(cfg, placement, context=context, device_memory=device_memory,
                                 **kw)
    doc["notes"] = notes(cfg, placement, doc)
    return doc


def notes(cfg: Step3Config, placement: Placement, doc: dict) -> list[str]:
    """What the figures assume, in one line each (also in the JSON's ``notes``)."""
    step35 = family.is_step35(cfg)
    out = [
        "Activations: the residual stream held across layers plus the largest of one attention "
        "layer (the plain product's [tokens, heads, context] score arrays, or, where "
        "--attention-impl auto picks it, the blocked kernel's score tile), one FFN layer (" +
        doc["moe_kernel"] + " MoE kernel) and the LM head with sampling "
        "(step3_jax/analysis/plan.py).",
        "GB = 1e9 bytes. --device-memory 80GB is 80e9 bytes: conservative for an 80 GB Hopper "
        "card, whose 80 GiB (85.9e9 B) of HBM include what the runtime reserves.",
    ]
    if doc["weights"] == "fp8":
        out.append("FP8 weights: 1 byte per value plus a float32 scale per 128x128 block; the "
                   "embedding, LM head, router and norms stay BF16.")
    if doc["kv_dtype"] == "fp8" and not step35:
        out.append("FP8 KV cache: 1 byte per value (512 B per token and layer for Step-3), no "
                   "scales counted.")
    if step35:
        out += step35_notes(cfg, placement, doc)
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
        out.append(f"Every attention device holds the embedding, LM head, norms, "
                   f"{'attention (q, k, v, o, head gate)' if step35 else 'MFA'} weights and "
                   f"routers whole: attention is data-parallel (afd.place, paper section 2).")
    return [" ".join(n.split()) for n in out]


def step35_notes(cfg, placement: Placement, doc: dict) -> list[str]:
    """The assumptions that are Step-3.5's own (``shared/spec/step35.md``)."""
    kv_b = BYTES[doc["kv_dtype"]]
    per_position = 2 * cfg.num_attention_groups * cfg.head_dim * kv_b
    full = sum(not cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    sliding = cfg.num_hidden_layers - full
    w = cfg.sliding_window or 0
    where = ("the attention devices choose the top-k (the paper's placement of the router) and "
             "send each token's FFN input with its experts and weights" if placement.afd else
             "split like the experts (ep)")
    out = [
        f"Step-3.5 KV cache ({doc['kv_dtype']}, {kv_b} byte(s) per value, no scales): the "
        f"{full} full-attention layers keep every position ({full * per_position:,} B per "
        f"token), the {sliding} sliding layers a ring of the last {w} positions "
        f"({sliding * w * per_position:,} B per sequence, fixed once it holds {w} tokens); "
        f"{cfg.num_attention_groups} K/V heads of {cfg.head_dim} on every layer "
        f"(Step35Config.kv_elements).",
        f"Step-3.5 router: the sigmoid router [{cfg.moe_num_experts}, {cfg.hidden_size}] "
        f"(BF16) and its selection bias (float32, the checkpoint's dtype) of each of the "
        f"{len(cfg.moe_layers)} MoE layers: {where}. The FFN side holds the "
        f"{cfg.moe_num_experts} routed experts (top-{cfg.moe_top_k}) of width "
        f"{cfg.moe_intermediate_size}, the shared expert ({cfg.share_expert_dim}) and the "
        f"dense FFNs ({cfg.intermediate_size}) of the "
        f"{cfg.num_hidden_layers - len(cfg.moe_layers)} dense layers.",
        "Step-3.5 attention activations: the plain product of step35_layers.attention (no "
        "blocked kernel for Step-3.5), the largest layer: its score arrays over the keys it "
        "reads plus the keys and values it attends over (the layer's cache concatenated with "
        "the new token's K/V: a copy of that layer's cache in the activation dtype, which a "
        "fused paged kernel would not make).",
        "Step-3.5 MoE activations: the ragged kernel's token-expert pairs, as for Step-3 (the "
        "deployment's kernel); step35_layers' reference kernel runs every expert on every "
        "token and is not what this plans.",
        f"Step-3.5 MTP layers ({cfg.num_nextn_predict_layers}) are not counted: decoding "
        f"without speculation.",
        "No compiled check for Step-3.5: it lowers Step-3's decode programs.",
    ]
    if doc["weights"] == "fp8":
        out.append("Step-3.5 FP8 weights: Step-3's rule (every matmul weight but the router, "
                   "embedding and LM head, the head gate g_proj included). The Hub "
                   "Step-3.5-Flash-FP8 checkpoint quantizes at least the routed experts; which "
                   "other Linears it quantizes is unverified (spec step35.md section 3).")
    return out
