"""``step3-jax plan --afd auto``: the AFD deployment's group sizes chosen for a workload, by the
memory plan (:mod:`step3_jax.analysis.plan`), for either family.

The paper's rule (``shared/spec/paper.md`` section 2): *attention instances scale with context
length at a fixed FFN batch*. So, in servers of :data:`~step3_jax.analysis.deployment.GPUS_PER_SERVER`
devices, for ``--batch`` sequences at ``--context`` tokens:

1. the FFN group: the fewest servers whose devices, one expert-parallel group (``ep`` = its
   device count, ``tp`` 1, as ``--afd A:F`` defaults), split the routed experts evenly and hold
   their FFN weights and activations within ``--device-memory``;
2. the attention group: the fewest servers with which every attention device then fits (its
   weights whole, its share of the batch's KV cache, its activations);
3. the batch: the largest that fits that deployment (``max_batch``), reported beside the one
   asked for.

This is the smallest deployment that *holds* the workload. Time is not modelled here: whether
it meets a TPOT SLA is ``step3-jax estimate``'s roofline (Step-3 only). For Step-3 at batch
6144 this gives the paper's attention groups at 4K and 8K (2A, 4A) and 13A at 32K (the paper:
16A); the paper sizes the FFN group for compute and network (2F), not memory, so its 2A2F at 4K
is 2A1F here.
"""

from __future__ import annotations

from step3_jax.analysis.deployment import GPUS_PER_SERVER, Placement
from step3_jax.analysis.plan import plan
from step3_jax.errors import Step3Error

MAX_SERVERS = 256  # per group: beyond this the workload is not a deployment of this model

RULE = ("--afd auto: the fewest FFN servers (of 8 devices, ep = their devices, tp 1) that split "
        "the experts evenly and hold the FFN weights, then the fewest attention servers whose "
        "devices hold the batch's KV cache at this context, by the memory plan (the paper: "
        "attention scales with context at a fixed FFN batch); no time or TPOT SLA is modelled "
        "in this choice (step3-jax estimate: Step-3's roofline).")


def _placement(a: int, f: int, micro_batches: int) -> Placement:
    return Placement(afd=True, attention=a * GPUS_PER_SERVER, ffn_ep=f * GPUS_PER_SERVER,
                     micro_batches=micro_batches)


def choose(cfg, *, batch: int, context: int, weights_format: str, kv_dtype: str,
           device_memory: int, micro_batches: int = 3) -> tuple[Placement, dict]:
    """The smallest AFD placement (attention, FFN servers) that holds ``batch`` sequences at
    ``context``, and how it was chosen (``{"rule", "ffn_servers", "attention_servers",
    "ffn_servers_skipped"}``). A one-line error when no size up to :data:`MAX_SERVERS` fits."""
    kw = dict(batch=batch, context=context, weights_format=weights_format, kv_dtype=kv_dtype,
              device_memory=device_memory)
    experts = cfg.moe_num_experts if cfg.moe_layers else 0
    skipped, ffn = [], None
    for f in range(1, MAX_SERVERS + 1):
        if experts and experts % (f * GPUS_PER_SERVER):
            skipped.append(f)  # ep would not divide the experts
            continue
        doc = plan(cfg, _placement(1, f, micro_batches), **kw)
        if doc["ffn_device_bytes"] <= device_memory:
            ffn = f
            break
    if ffn is None:
        raise Step3Error(f"--afd auto: no FFN group of up to {MAX_SERVERS} servers holds "
                         f"{cfg.name}'s FFN weights and the activations of {batch} sequences in "
                         f"{device_memory / 1e9:.1f} GB per device; lower --batch")
    lo, hi = 1, 1
    while not plan(cfg, _placement(hi, ffn, micro_batches), **kw)["fits"]:
        if hi >= MAX_SERVERS:
            raise Step3Error(f"--afd auto: {batch} sequences at context {context} do not fit "
                             f"{MAX_SERVERS} attention servers of {device_memory / 1e9:.1f} GB "
                             f"devices; lower --batch")
        lo, hi = hi + 1, min(2 * hi, MAX_SERVERS)
    while lo < hi:  # the fewest servers that fit: fitting is monotone in the server count
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if plan(cfg, _placement(mid, ffn, micro_batches), **kw)["fits"] \
            else (mid + 1, hi)
    return _placement(lo, ffn, micro_batches), {
        "rule": RULE, "attention_servers": lo, "ffn_servers": ffn,
        "ffn_servers_skipped": skipped}

