"""Attention-FFN Disaggregation (paper §2): attention and FFN on two disjoint device groups.

The attention group holds the embedding, every layer's norms, MFA weights and **router**, the KV
cache and the LM head; it runs data-parallel (each attention device its own sequences). The FFN
group holds only the expert, shared-expert and dense-FFN weights, split by expert (``ep``) and
width (``tp``). No device holds both. Per layer and micro-batch:

1. each attention device: ``h = x + MFA(norm_in(x))``, ``y = norm_post(h)``, the router's
   top-k; ``y`` quantized to FP8 e4m3 with one scale per token (or sent as ``transfer_dtype``);
   its layer's K/V cache is donated to the program and updated in place;
2. A→F: each attention device's ``y``, scales and routing go to the FFN group
   (``jax.device_put`` from that one device to the FFN mesh);
3. FFN group: routed experts + shared expert (or the dense FFN) on the dequantized tokens of all
   attention devices, one program over the FFN mesh;
4. F→A: each attention device's rows of the result, in the compute dtype, come back to it and
   are added to ``h``.

Step-3.5 runs the same way (``step35.attention_block`` over its per-layer cache, sliding rings
included, and the biased sigmoid router with its float32 bias on the attention side; the routed
and shared experts or the dense FFN, clamped at the layer's limits, on the FFN group, its experts
stacked as the loader keeps them), in one process only.

The programs and the micro-batch schedule that drives them from Python are in
:mod:`step3_jax.runtime.afd_schedule`; the per-device timeline of a decode step and its stage
metrics (per-layer attention / FFN / transfer time, bubble fraction, overlap) in
:mod:`step3_jax.runtime.afd_trace`.
"""


from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from step3_jax.checkpoint.loader import per_expert as per_expert_layout
from step3_jax.errors import Step3Error
from step3_jax.model.sharding import axis_sizes, drop_first_axis, make_mesh, param_shardings
from step3_jax.model.step35_reader import AnyConfig
from step3_jax.model.step35_weights import Moe35
from step3_jax.model.weights import Moe, Params, stack_moe, unstack_moe
from step3_jax.runtime import sampling
from step3_jax.runtime.afd_schedule import (SCHEDULES, RouterOnly, Shard, cache_feed, logits,
                                            new_cache, next_tokens, stack_pass)
from step3_jax.runtime.afd_trace import device_intervals, summarize, traced
from step3_jax.runtime.generate import (FINISH_REASONS, MIN_PREFILL_BUCKET, GenerationResult,
                                        bucket, check_eos, check_prompts, shape_buckets)
from step3_jax.runtime.metrics import CompileClock, report

TRANSFER_DTYPES = ("float8_e4m3fn", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class AfdPlan:
    attention: int                 # attention devices (data-parallel)
    ffn_ep: int = 1                # FFN devices = ffn_ep * ffn_tp
    ffn_tp: int = 1
    micro_batches: int = 3
    transfer_dtype: str = "float8_e4m3fn"

    @property
    def ffn(self) -> int:
        return self.ffn_ep * self.ffn_tp


def parse_plan(afd: str, ffn_mesh: str | None = None, micro_batches: int = 3,
               transfer_dtype: str = "float8_e4m3fn") -> AfdPlan:
    """``--afd A:F`` (+ ``--ffn-mesh ep=E,tp=T`` with E*T = F; default ep=F)."""
    a, sep, f = afd.partition(":")
    if not sep or not a.isdigit() or not f.isdigit() or int(a) < 1 or int(f) < 1:
        raise Step3Error(f"--afd must be A:F with positive integers, got {afd!r}")
    sizes = {"ep": int(f), "tp": 1}
    if ffn_mesh:
        sizes = axis_sizes(ffn_mesh, ("ep", "tp"), "--ffn-mesh")
        if sizes["ep"] * sizes["tp"] != int(f):
            raise Step3Error(f"--ffn-mesh ep={sizes['ep']},tp={sizes['tp']} uses "
                             f"{sizes['ep'] * sizes['tp']} devices, --afd gives the FFN group {f}")
    if micro_batches < 1:
        raise Step3Error(f"--micro-batches must be >= 1, got {micro_batches}")
    if transfer_dtype not in TRANSFER_DTYPES:
        raise Step3Error(f"--afd-transfer-dtype must be one of {', '.join(TRANSFER_DTYPES)}")
    return AfdPlan(int(a), sizes["ep"], sizes["tp"], micro_batches, transfer_dtype)


@dataclasses.dataclass
class AfdModel:
    """Weights split and placed on the two groups, with the jitted per-group steps."""

    cfg: AnyConfig
    plan: AfdPlan
    attn_mesh: jax.sharding.Mesh
    ffn_mesh: jax.sharding.Mesh
    attn: Params   # embedding, norms, attention, routers (RouterOnly), LM head; else ``ffn`` None
    ffn: tuple     # per layer: Mlp, or Moe / Moe35 without its router (and router bias)
    local: tuple = ()  # per attention device: ``attn`` as that device's own arrays (no copy)
    remote: object = None  # the FFN group in other processes (distributed.RemoteFfn), or None

    @property
    def attn_devices(self) -> list:
        return list(self.attn_mesh.devices.flat)

    @property
    def ffn_devices(self) -> list:
        return list(self.ffn_mesh.devices.flat)

    @property
    def placement(self) -> dict:
        ids = lambda mesh: sorted(d.id for d in mesh.devices.flat)  # noqa: E731
        return {"attention_devices": ids(self.attn_mesh), "ffn_devices": ids(self.ffn_mesh)}

    def transfer_bytes_per_layer(self, tokens: int) -> dict:
        """Bytes each way per layer for ``tokens`` tokens: A→F activations (+ FP8 scales) and
        routing (top-k float32 weights + int32 ids), F→A results in the compute dtype."""
        H, k = self.cfg.hidden_size, self.cfg.moe_top_k
        item = np.dtype(self.plan.transfer_dtype).itemsize
        scales = 4 if self.plan.transfer_dtype == "float8_e4m3fn" else 0
        routing = k * 8 if self.cfg.moe_layers else 0
        return {"a2f": tokens * (H * item + scales + routing),
                "f2a": tokens * H * np.dtype(self.cfg.dtype).itemsize}


def group_meshes(plan: AfdPlan, devices: Sequence | None = None):
    """The two disjoint meshes: attention on the first ``A`` devices (``dp``), the FFN group on
    the next ``F`` (``ep`` x ``tp``)."""
    devices = list(jax.devices() if devices is None else devices)
    if plan.attention + plan.ffn > len(devices):
        raise Step3Error(f"--afd {plan.attention}:{plan.ffn} needs {plan.attention + plan.ffn} "
                         f"devices, only {len(devices)} available")
    attn_mesh = make_mesh(dp=plan.attention, devices=devices[: plan.attention])
    ffn_mesh = make_mesh(ep=plan.ffn_ep, tp=plan.ffn_tp,
                         devices=devices[plan.attention: plan.attention + plan.ffn])
    return attn_mesh, ffn_mesh


def _is_moe(ffn) -> bool:
    """A routed layer's FFN, of either family (Step-3's ``Moe``, Step-3.5's ``Moe35``)."""
    return isinstance(ffn, (Moe, Moe35))


def _router_part(ffn) -> dict:
    """The MoE fields that live on the attention side: the router, and on Step-3.5 its bias."""
    return {k: getattr(ffn, k) for k in ("router", "router_bias") if hasattr(ffn, k)}


def afd_shardings(cfg: AnyConfig, plan: AfdPlan, devices: Sequence | None = None) -> Params:
    """Where every weight lives under AFD (a params-shaped tree, for ``load(shardings=...)``):
    attention weights, norms, routers (Step-3.5: with their bias), embedding and LM head
    replicated on the attention group; expert, shared-expert and dense-FFN weights split over the
    FFN group by the rules table."""
    attn_mesh, ffn_mesh = group_meshes(plan, devices)
    ffn_sh = param_shardings(cfg, ffn_mesh)  # also checks ep/tp divide what they split
    attn = NamedSharding(attn_mesh, P())
    on_attn = lambda tree: jax.tree.map(lambda _: attn, tree)  # noqa: E731
    layers = tuple(
        layer.replace(input_norm=attn, post_norm=attn, attn=on_attn(layer.attn),
                      ffn=layer.ffn.replace(**on_attn(_router_part(layer.ffn)))
                      if _is_moe(layer.ffn) else layer.ffn)
        for layer in ffn_sh.layers)
    return ffn_sh.replace(embed=attn, layers=layers, final_norm=attn,
                          lm_head=None if cfg.tie_word_embeddings else attn)


def place(params: Params, cfg: AnyConfig, plan: AfdPlan,
          devices: Sequence | None = None) -> AfdModel:
    """Split ``params`` into the attention and FFN parts and place them on disjoint groups.

    Weights already where :func:`afd_shardings` puts them (``load(shardings=afd_shardings(...),
    expert_parallel=plan.ffn_ep)``, which restores each weight straight onto its group) are not
    moved or copied.
    """
    attn_mesh, ffn_mesh = group_meshes(plan, devices)
    attn, local = place_attention(params, attn_mesh)
    return AfdModel(cfg, plan, attn_mesh, ffn_mesh, attn, place_ffn(params, cfg, plan, devices),
                    local)


def place_attention(params: Params, attn_mesh) -> tuple[Params, tuple]:
    """The attention side: every weight but the FFNs' (routers kept), replicated on the group,
    and each device's single-device view of it."""
    layers = tuple(
        layer.replace(ffn=RouterOnly(**_router_part(layer.ffn)) if _is_moe(layer.ffn) else None)
        for layer in params.layers)
    attn = jax.device_put(params.replace(layers=layers), NamedSharding(attn_mesh, P()))
    return attn, tuple(_on_device(attn, d) for d in attn_mesh.devices.flat)


def place_ffn(params: Params, cfg: AnyConfig, plan: AfdPlan,
              devices: Sequence | None = None) -> tuple:
    """The FFN side: per layer the dense FFN, or the MoE without its router (and bias), split
    over the FFN group by the rules table (per-expert arrays for the CPU loop kernel when ``ep``
    is 1 and the loader's ``per_expert`` says so; Step-3.5's experts stay stacked)."""
    shardings = afd_shardings(cfg, plan, devices)
    per_expert = per_expert_layout(cfg, plan.ffn_ep)
    no_router = lambda x: x.replace(**{k: None for k in _router_part(x)})  # noqa: E731
    ffn = []
    for layer, sh in zip(params.layers, shardings.layers):
        f, s = layer.ffn, sh.ffn
        if _is_moe(f):
            f, s = no_router(f), no_router(s)
            f = unstack_moe(f) if per_expert else stack_moe(f)
            if per_expert:  # each expert's arrays take the stacked sharding minus its first axis
                s = s.replace(**{k: tuple(drop_first_axis(getattr(s, k)) for _ in getattr(f, k))
                                 for k in ("gate", "up", "down")})
        ffn.append(jax.device_put(f, s))
    return tuple(ffn)


def _on_device(tree, device):
    """The single-device arrays that make up a replicated (or sharded) tree on ``device``."""
    def one(x):
        return next(s.data for s in x.addressable_shards if s.device == device)

    return jax.tree.map(one, tree)


# ----- score and generate ------------------------------------------------------------------------

def score(m: AfdModel, ids: Sequence[int]) -> list[float]:
    """``log p(ids[i] | ids[:i])`` through the disaggregated data path (one sequence, on the
    first attention device)."""
    (ids,) = check_prompts([ids], m.cfg)
    tokens = np.zeros((1, bucket(len(ids), MIN_PREFILL_BUCKET)), np.int32)
    tokens[0, : len(ids)] = ids
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    shard = Shard(0, m.attn_devices[0], slice(0, 1))
    [[(h, f)]], _ = stack_pass(m, [[shard]], [[{"tokens": tokens, "positions": positions}]])
    logp = jax.nn.log_softmax(logits(m.local[0], h, f, cfg=m.cfg)[0], axis=-1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


def generate(m: AfdModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Sequence[int] | None = None, schedule: str = "pipelined",
             profile: bool = True, keep_timeline: bool = False):
    """Generate through AFD; same contract as ``generate.generate``: ``(results, metrics)``.

    The batch is padded to ``micro_batches x A x r`` rows; micro-batch ``j`` is split over the
    ``A`` attention devices, ``r`` rows each, and each device keeps those rows' KV cache.

    With ``profile``, the stage times, bubble fraction and overlap in ``metrics["afd"]`` come from
    a ``jax.profiler`` trace of the second decode step (or the first; the first compiles), see
    ``afd_trace.device_intervals``; ``keep_timeline`` adds its intervals (seconds). The trace costs
    ~10-100 ms. The metrics are :mod:`step3_jax.runtime.metrics`'s schema: compilation (the
    programs compile as they are first dispatched) is measured apart and left out of
    ``prefill_ms`` and ``decode_ms``, and so is the profiler's own time; ``decode_step_ms`` is
    the median of the decode steps after the first, unprofiled (with fewer than 4 new tokens,
    ``decode_ms`` over the steps).
    ``schedule``: ``"serial"`` and ``"lockstep"`` are the controls for the overlap measurement
    (see ``afd_schedule.stack_pass``).
    """
    cfg, plan = m.cfg, m.plan
    prompts = check_prompts(prompts, cfg)
    check_eos(eos_ids, cfg)
    sampling.check(temperature, top_k, top_p)
    if schedule not in SCHEDULES:
        raise Step3Error(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    n, A = len(prompts), plan.attention
    r = -(-n // (plan.micro_batches * A))  # rows per attention device and micro-batch
    rows_per_mb = r * A
    batch = rows_per_mb * plan.micro_batches
    rows = prompts + [[0]] * (batch - n)
    longest = max(len(p) for p in prompts)
    chunk, capacity = shape_buckets(longest, max_new_tokens, cfg)
    tokens = np.zeros((batch, chunk), np.int32)
    for b, p in enumerate(rows):
        tokens[b, : len(p)] = p
    lengths = np.array([len(p) for p in rows], np.int32)
    eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
    devices = m.attn_devices
    mbs = [[Shard(a, devices[a], slice(j * rows_per_mb + a * r, j * rows_per_mb + (a + 1) * r))
            for a in range(A)] for j in range(plan.micro_batches)]
    shards = [sh for shards in mbs for sh in shards]
    base = jax.random.PRNGKey(seed)
    keys = np.asarray(jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch)))
    knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
    # Each attention device samples the rows of all its micro-batches in one program.
    mine = [[k for k, sh in enumerate(shards) if sh.index == a] for a in range(A)]
    rows_of = [np.concatenate([np.arange(batch)[shards[k].rows] for k in ks]) for ks in mine]
    keys = [jax.device_put(keys[rows], devices[a]) for a, rows in enumerate(rows_of)]

    def draw(state, step: int, last=None) -> np.ndarray:
        """Every row's next token (all dispatched before any is read); ``last``: each row's
        prompt length (prefill), else position 0 of a one-token step."""
        flat = [x for xs in state for x in xs]
        drawn = []
        for a, (ks, rows) in enumerate(zip(mine, rows_of)):
            at = np.zeros(len(rows), np.int32) if last is None else last[rows] - 1
            drawn.append(next_tokens(m.local[a], tuple(flat[k][0] for k in ks),
                                      tuple(flat[k][1] for k in ks), at, keys[a],
                                      np.int32(step), *knobs, cfg=cfg))
        tokens = np.zeros(batch, np.int32)
        for rows, t in zip(rows_of, drawn):
            tokens[rows] = np.asarray(t)
        return tokens

    with CompileClock() as clock:  # AFD's programs compile as they are first dispatched
        # Prefill: attention within each prompt chunk, K/V written into a fresh cache per shard.
        feeds = []
        for sh in shards:
            new_cache(cfg, sh, capacity)
            feeds.append({"tokens": tokens[sh.rows],
                          "positions": np.broadcast_to(np.arange(chunk, dtype=np.int32),
                                                       (r, chunk)).copy(),
                          **cache_feed(cfg, None, lengths[sh.rows], chunk, capacity)})
        started, since = time.perf_counter(), clock.now()
        state, tail = stack_pass(m, mbs, _by_mb(feeds, A), schedule)
        next_tok = draw(state, 0, last=lengths)
        prefill_s = time.perf_counter() - started - clock.seconds(since)
        cur = lengths.copy()

        out = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        reason = np.zeros(batch, np.int32)
        budget = np.full(batch, max_new_tokens)
        budget[n:] = 1
        step = 0
        profiled = None
        # Step 1 compiles; a remote FFN's devices are in another process, out of this one's trace.
        profile_step = min(2, max_new_tokens - 1) if profile and m.remote is None else 0
        step_times: list[float] = []  # compiled, unprofiled steps
        decode_s = 0.0
        while True:
            for b in np.flatnonzero(~done):
                out[b].append(int(next_tok[b]))
                reason_b = (1 if next_tok[b] in eos else 2 if len(out[b]) >= budget[b]
                            else 3 if cur[b] >= capacity else 0)
                if reason_b:
                    done[b], reason[b] = True, reason_b
            if done.all():
                break
            step += 1
            started, since, hidden = time.perf_counter(), clock.now(), 0.0
            feed = (~done).astype(np.int32)
            feeds = [{"tokens": next_tok[sh.rows][:, None], "positions": cur[sh.rows][:, None],
                      **cache_feed(cfg, cur[sh.rows], feed[sh.rows], 1, capacity)}
                     for sh in shards]
            if step == profile_step:  # the trace must hold this pass's launches and no others
                jax.block_until_ready(tail)
                traced_at = time.perf_counter()
                (state, tail, pass_s), trace = traced(_timed, stack_pass, m, mbs,
                                                      _by_mb(feeds, A), schedule)
                hidden = time.perf_counter() - traced_at - pass_s  # the profiler's own time
                profiled = trace and device_intervals(trace, m, plan.micro_batches)
            else:
                state, tail = stack_pass(m, mbs, _by_mb(feeds, A), schedule)
            cur = np.minimum(cur + feed, capacity)
            next_tok = np.where(done, next_tok, draw(state, step))
            elapsed = time.perf_counter() - started - hidden - clock.seconds(since)
            decode_s += elapsed
            if step > 1 and step != profile_step:
                step_times.append(elapsed)
    results = [GenerationResult(prompt_ids=p, generated_ids=out[b],
                                finish_reason=FINISH_REASONS[reason[b]])
               for b, p in enumerate(prompts)]
    per_layer = m.transfer_bytes_per_layer(rows_per_mb)
    step_s = float(np.median(step_times)) if step_times else decode_s / step if step else None
    metrics = report(cfg, batch=n, mesh={"attention": {"dp": A},
                                         "ffn": {"ep": plan.ffn_ep, "tp": plan.ffn_tp}},
                     prefill_bucket=chunk, cache_capacity=capacity,
                     generated_tokens=sum(len(out[b]) for b in range(n)), decode_steps=step,
                     compile_s=clock.seconds(), prefill_s=prefill_s, decode_s=decode_s,
                     decode_step_s=step_s)
    metrics |= {"placement": m.placement,
                "afd": {"micro_batches": plan.micro_batches,
                        "tokens_per_micro_batch": rows_per_mb,
                        "a2f_bytes_per_layer": per_layer["a2f"] * plan.micro_batches,
                        "f2a_bytes_per_layer": per_layer["f2a"] * plan.micro_batches,
                        "transfer_dtype": plan.transfer_dtype, "schedule": schedule,
                        "timeline_source": "jax.profiler" if profiled else None}}
    if profiled:
        stats, waits = summarize(profiled, cfg.num_hidden_layers, schedule == "lockstep")
        metrics["afd"].update({k: round(v, 4) for k, v in stats.items()})
        if keep_timeline:
            metrics["afd"]["timeline"] = profiled + waits
    return results, metrics


def _timed(fn, *args):
    """``(*fn(*args), seconds)``, its outputs awaited: a pass timed inside a profiler trace."""
    started = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return (*out, time.perf_counter() - started)


def _by_mb(feeds: list, per_mb: int) -> list[list]:
    return [feeds[k: k + per_mb] for k in range(0, len(feeds), per_mb)]
