"""Attention-FFN Disaggregation (paper §2): attention and FFN on two disjoint device groups.

The attention group holds the embedding, every layer's norms, MFA weights and **router**, the KV
cache and the LM head; it runs data-parallel (each attention device its own sequences). The FFN
group holds only the expert, shared-expert and dense-FFN weights, split by expert (``ep``) and
width (``tp``). No device holds both. Per layer and micro-batch:

1. attention group: ``h = x + MFA(norm_in(x))``, ``y = norm_post(h)``, the router's top-k;
   ``y`` quantized to FP8 e4m3 with one scale per token (or sent as ``transfer_dtype``);
2. A→F: ``y``, its scales and the routing go to the FFN group (``jax.device_put`` across meshes);
3. FFN group: routed experts + shared expert (or the dense FFN) on the dequantized ``y``;
4. F→A: the result, in the compute dtype, comes back and is added to ``h`` on the attention side.

Micro-batches are dispatched layer by layer, micro-batch after micro-batch; JAX's asynchronous
dispatch lets the FFN group work on micro-batch ``i`` while the attention group works on
``i + 1``. The loop is driven from Python (two device groups, two programs), as real AFD
deployments drive two sets of instances.

:class:`Timeline` stamps when each op's output is ready (waiter threads, so nothing is
serialized) and rebuilds each group's busy intervals, giving per-layer attention / FFN /
transfer times, the bubble fraction and how long the two groups overlapped. These are host-side
observations: on emulated CPU devices saturating the cores they misattribute time between the
groups (BENCHMARKS.md); a per-device profiler trace is the reliable source.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from step3_jax import model, sampling
from step3_jax.cache import init_cache, write_positions
from step3_jax.config import Step3Config
from step3_jax.errors import Step3Error
from step3_jax.generate import FINISH_REASONS, GenerationResult, bucket, check_prompts
from step3_jax.layers import rms_norm
from step3_jax.moe import resolve_impl, route
from step3_jax.sharding import axis_sizes, drop_first_axis, make_mesh, param_shardings
from step3_jax.weights import Moe, Params, stack_moe, unstack_moe

TRANSFER_DTYPES = ("float8_e4m3fn", "bfloat16", "float32")
_FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


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

    cfg: Step3Config
    plan: AfdPlan
    attn_mesh: jax.sharding.Mesh
    ffn_mesh: jax.sharding.Mesh
    attn: Params   # embedding, norms, MFA, routers, LM head; every ``ffn`` field None
    ffn: tuple     # per layer: Mlp, or Moe without its router

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


def afd_shardings(cfg: Step3Config, plan: AfdPlan, devices: Sequence | None = None) -> Params:
    """Where every weight lives under AFD (a params-shaped tree, for ``load(shardings=...)``):
    attention weights, norms, routers, embedding and LM head replicated on the attention group;
    expert, shared-expert and dense-FFN weights split over the FFN group by the rules table."""
    attn_mesh, ffn_mesh = group_meshes(plan, devices)
    ffn_sh = param_shardings(cfg, ffn_mesh)  # also checks ep/tp divide what they split
    attn = NamedSharding(attn_mesh, P())
    on_attn = lambda tree: jax.tree.map(lambda _: attn, tree)  # noqa: E731
    layers = tuple(
        layer.replace(input_norm=attn, post_norm=attn, attn=on_attn(layer.attn),
                      ffn=layer.ffn.replace(router=attn) if isinstance(layer.ffn, Moe)
                      else layer.ffn)
        for layer in ffn_sh.layers)
    return ffn_sh.replace(embed=attn, layers=layers, final_norm=attn,
                          lm_head=None if cfg.tie_word_embeddings else attn)


def place(params: Params, cfg: Step3Config, plan: AfdPlan,
          devices: Sequence | None = None) -> AfdModel:
    """Split ``params`` into the attention and FFN parts and place them on disjoint groups.

    Weights already where :func:`afd_shardings` puts them (``load(shardings=afd_shardings(...),
    expert_parallel=plan.ffn_ep)``, which restores each weight straight onto its group) are not
    moved or copied.
    """
    attn_mesh, ffn_mesh = group_meshes(plan, devices)
    shardings = afd_shardings(cfg, plan, devices)
    per_expert = resolve_impl(cfg) == "loop" and plan.ffn_ep == 1  # the CPU kernel's layout
    ffn = []
    for layer, sh in zip(params.layers, shardings.layers):
        f, s = layer.ffn, sh.ffn
        if isinstance(f, Moe):
            f, s = f.replace(router=None), s.replace(router=None)
            f = unstack_moe(f) if per_expert else stack_moe(f)
            if per_expert:  # each expert's arrays take the stacked sharding minus its first axis
                s = s.replace(**{k: tuple(drop_first_axis(getattr(s, k)) for _ in getattr(f, k))
                                 for k in ("gate", "up", "down")})
        ffn.append(jax.device_put(f, s))
    attn_layers = tuple(
        layer.replace(ffn=_RouterOnly(layer.ffn.router) if isinstance(layer.ffn, Moe) else None)
        for layer in params.layers)
    attn = jax.device_put(params.replace(layers=attn_layers), NamedSharding(attn_mesh, P()))
    return AfdModel(cfg, plan, attn_mesh, ffn_mesh, attn, tuple(ffn))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _RouterOnly:
    router: jax.Array


# ----- the two programs ------------------------------------------------------------------------

def _quantize(y, dtype: str):
    if dtype != "float8_e4m3fn":
        return y.astype(dtype), None
    amax = jnp.max(jnp.abs(y.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / _FP8_MAX, 1.0)
    return (y / scale).astype(jnp.float8_e4m3fn), scale


@functools.partial(jax.jit, static_argnames=("cfg", "transfer"))
def _attention_step(layer, h, f, positions, kv, *, cfg, transfer):
    """Residual add of the previous layer's FFN output, MFA, post-norm, router, quantize."""
    x = h + f.astype(h.dtype)
    h, new_kv = model.attention_block(layer, x, positions, kv, cfg)
    y = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
    routing = route(y, layer.ffn.router, cfg) if layer.ffn is not None else None
    return h, new_kv, (*_quantize(y, transfer), routing)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ffn_step(ffn, q, scale, routing, *, cfg):
    y = q.astype(cfg.dtype) if scale is None else (q.astype(jnp.float32) * scale).astype(cfg.dtype)
    return model.ffn_block(ffn, y, cfg, routing)


_sample = jax.jit(sampling.sample)  # eager, its lax.cond would compile on every call


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(attn: Params, h, f, *, cfg):
    return model.logits_from_hidden(attn, h + f.astype(h.dtype), cfg)


def _to(mesh, tree, batch_split: bool):
    spec = P("dp") if batch_split else P()
    return jax.device_put(tree, NamedSharding(mesh, spec))


class Timeline:
    """When each dispatched piece of work finishes, seen from the host, to rebuild busy intervals.

    Every op's output gets a waiter thread (``block_until_ready`` releases the GIL) that stamps
    the moment it is ready. An op starts when its inputs are ready and its device group has
    finished the op before it; it ends when its output is ready. This measures what the devices
    do without serializing them, so the overlap of the two groups is observed, not assumed.
    """

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ops: list[dict] = []

    def record(self, group: str, kind: str, layer: int, mb: int, out, after: int | None,
               dispatched: float):
        """Register an op dispatched at ``dispatched`` (``perf_counter``); ``after`` is the index
        of the op producing its input (or None)."""
        op = {"group": group, "kind": kind, "layer": layer, "mb": mb, "after": after,
              "dispatched": dispatched - self.t0}

        def wait():  # one thread per op: a shared pool would stamp queued ops late
            jax.block_until_ready(out)
            op["ready"] = time.perf_counter()

        op["thread"] = threading.Thread(target=wait, daemon=True)
        op["thread"].start()
        self.ops.append(op)
        return len(self.ops) - 1

    def intervals(self) -> list[dict]:
        last_end: dict[str, float] = {}
        out = []
        for op in self.ops:
            op["thread"].join()
            end = op["ready"] - self.t0
            start = max(op["dispatched"], last_end.get(op["group"], 0.0),
                        out[op["after"]]["end"] if op["after"] is not None else 0.0)
            start = min(start, end)
            last_end[op["group"]] = end
            out.append({k: op[k] for k in ("group", "kind", "layer", "mb")} |
                       {"start": start, "end": end})
        return out


def summarize(intervals: list[dict], layers: int) -> dict:
    """Per-layer stage times (summed over micro-batches), the bubble fraction and the overlap."""
    def busy(group):
        return sum(i["end"] - i["start"] for i in intervals if i["group"] == group)

    def merged(group):
        spans = sorted((i["start"], i["end"]) for i in intervals if i["group"] == group)
        out = []
        for a, b in spans:
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out

    wall = max(i["end"] for i in intervals) - min(i["start"] for i in intervals)
    overlap = sum(max(0.0, min(b1, b2) - max(a1, a2))
                  for a1, b1 in merged("attention") for a2, b2 in merged("ffn"))
    attn, ffn = busy("attention"), busy("ffn")
    return {"attention_ms_per_layer": 1e3 * attn / layers, "ffn_ms_per_layer": 1e3 * ffn / layers,
            "transfer_ms_per_layer": 1e3 * busy("transfer") / layers,
            "step_ms": 1e3 * wall,
            "bubble_fraction": 1.0 - (attn + ffn) / (2 * wall) if wall > 0 else 0.0,
            "overlap_ms": 1e3 * overlap}


def _stack_pass(m: AfdModel, tokens_mb, positions_mb, kv_mb, timeline: Timeline | None = None):
    """All layers for every micro-batch; returns final (h, f) per micro-batch and new caches."""
    cfg, plan = m.cfg, m.plan
    split = [t.shape[0] % plan.attention == 0 for t in tokens_mb]
    hs = [_to(m.attn_mesh, jnp.take(m.attn.embed, jnp.asarray(t), axis=0), s)
          for t, s in zip(tokens_mb, split)]
    fs = [jnp.zeros_like(h) for h in hs]
    back = [None] * len(tokens_mb)  # timeline index of micro-batch j's last F->A transfer
    new_kv = [([], []) for _ in tokens_mb]
    for i, layer in enumerate(m.attn.layers):
        for j in range(len(tokens_mb)):  # micro-batch j's FFN overlaps micro-batch j+1's MFA
            kv = None if kv_mb[j] is None else (kv_mb[j][0][i], kv_mb[j][1][i], *kv_mb[j][2:])
            t_attn = time.perf_counter()
            with jax.named_scope("afd_attention"):
                hs[j], updated, (q, scale, routing) = _attention_step(
                    layer, hs[j], fs[j], positions_mb[j], kv, cfg=cfg,
                    transfer=plan.transfer_dtype)
            if updated is not None:
                new_kv[j][0].append(updated[0])
                new_kv[j][1].append(updated[1])
            t_send = time.perf_counter()
            sent = _to(m.ffn_mesh, (q, scale, routing), False)
            t_ffn = time.perf_counter()
            with jax.set_mesh(m.ffn_mesh):  # the MoE runs expert-parallel on the FFN group
                out = _ffn_step(m.ffn[i], *sent, cfg=cfg)
            t_back = time.perf_counter()
            fs[j] = _to(m.attn_mesh, out, split[j])
            if timeline is not None:
                a = timeline.record("attention", "attention", i, j, hs[j], back[j], t_attn)
                s = timeline.record("transfer", "a2f", i, j, sent, a, t_send)
                f = timeline.record("ffn", "ffn", i, j, out, s, t_ffn)
                back[j] = timeline.record("transfer", "f2a", i, j, fs[j], f, t_back)
    return hs, fs, new_kv


def score(m: AfdModel, ids: Sequence[int]) -> list[float]:
    """``log p(ids[i] | ids[:i])`` through the disaggregated data path (one micro-batch)."""
    (ids,) = check_prompts([ids], m.cfg)
    tokens = np.zeros((1, bucket(len(ids), 16)), np.int32)
    tokens[0, : len(ids)] = ids
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    (h,), (f,), _ = _stack_pass(m, [tokens], [positions], [None])
    logp = jax.nn.log_softmax(_logits(m.attn, h, f, cfg=m.cfg)[0], axis=-1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


def generate(m: AfdModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Sequence[int] | None = None, keep_timeline: bool = False):
    """Generate through AFD; same contract as ``generate.generate``: ``(results, metrics)``.

    The stage times, bubble fraction and overlap in ``metrics["afd"]`` are measured on the third
    decode step (a :class:`Timeline`; the first two compile); ``keep_timeline`` adds its intervals.
    ``decode_step_ms`` is the median wall time of the later, unprofiled steps.
    """
    cfg, plan = m.cfg, m.plan
    prompts = check_prompts(prompts, cfg)
    sampling.check(temperature, top_k, top_p)
    n = len(prompts)
    rows_per_mb = -(-n // plan.micro_batches)
    rows_per_mb = -(-rows_per_mb // plan.attention) * plan.attention  # data-parallel attention
    batch = rows_per_mb * plan.micro_batches
    rows = prompts + [[0]] * (batch - n)
    longest = max(len(p) for p in prompts)
    capacity = min(bucket(longest + max_new_tokens - 1, 64), cfg.max_position_embedding)
    chunk = min(bucket(longest, 16), capacity)
    tokens = np.zeros((batch, chunk), np.int32)
    for b, p in enumerate(rows):
        tokens[b, : len(p)] = p
    lengths = np.array([len(p) for p in rows], np.int32)
    eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
    mbs = [slice(j * rows_per_mb, (j + 1) * rows_per_mb) for j in range(plan.micro_batches)]
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch))
    knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))

    # Prefill: attention within each prompt chunk, K/V written into a fresh cache per micro-batch.
    caches = []
    for sl in mbs:
        c = init_cache(cfg, rows_per_mb, capacity)
        slots = write_positions(c.lengths, jnp.asarray(lengths[sl]), chunk, capacity)
        caches.append((c.k, c.v, slots, None))
    positions = [jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (rows_per_mb, chunk))] * \
        len(mbs)
    hs, fs, new_kv = _stack_pass(m, [tokens[sl] for sl in mbs], positions, caches)
    cur = lengths.copy()
    next_tok = np.zeros(batch, np.int32)
    for j, sl in enumerate(mbs):
        last = jnp.asarray(cur[sl] - 1)
        logits = _logits(m.attn, hs[j], fs[j], cfg=cfg)
        logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        next_tok[sl] = np.asarray(_sample(logits, keys[sl], jnp.int32(0), *knobs))
    caches = [(tuple(k), tuple(v)) for k, v in new_kv]

    out = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    reason = np.zeros(batch, np.int32)
    budget = np.full(batch, max_new_tokens)
    budget[n:] = 1
    step = 0
    profiled = None
    step_times: list[float] = []
    while True:
        for b in np.flatnonzero(~done):
            out[b].append(int(next_tok[b]))
            r = (1 if next_tok[b] in eos else 2 if len(out[b]) >= budget[b]
                 else 3 if cur[b] >= capacity else 0)
            if r:
                done[b], reason[b] = True, r
        if done.all():
            break
        step += 1
        started = time.perf_counter()
        feed = (~done).astype(np.int32)
        kv_mb, pos_mb = [], []
        for j, sl in enumerate(mbs):
            slots = write_positions(jnp.asarray(cur[sl]), jnp.asarray(feed[sl]), 1, capacity)
            key_len = jnp.asarray(np.minimum(cur[sl] + feed[sl], capacity))
            kv_mb.append((*caches[j], slots, key_len))
            pos_mb.append(jnp.asarray(cur[sl])[:, None])
        # Profile one step: the third (the first two compile: fresh-cache and decode-cache
        # input shardings differ), or the last there is.
        timeline = Timeline() if step == min(3, max_new_tokens - 1) else None
        hs, fs, new_kv = _stack_pass(m, [next_tok[sl][:, None] for sl in mbs], pos_mb, kv_mb,
                                     timeline)
        if timeline is not None:
            profiled = timeline.intervals()
        caches = [(tuple(k), tuple(v)) for k, v in new_kv]
        cur = np.minimum(cur + feed, capacity)
        for j, sl in enumerate(mbs):
            logits = _logits(m.attn, hs[j], fs[j], cfg=cfg)[:, 0]
            drawn = np.asarray(_sample(logits, keys[sl], jnp.int32(step), *knobs))
            next_tok[sl] = np.where(done[sl], next_tok[sl], drawn)
        if step > 2 and timeline is None:  # compiled, unprofiled steps
            step_times.append(time.perf_counter() - started)
    results = [GenerationResult(prompt_ids=p, generated_ids=out[b],
                                finish_reason=FINISH_REASONS[reason[b]])
               for b, p in enumerate(prompts)]
    per_layer = m.transfer_bytes_per_layer(rows_per_mb)
    metrics = {"batch": n, "decode_steps": step,
               "generated_tokens": sum(len(out[b]) for b in range(n)),
               "decode_step_ms": 1e3 * float(np.median(step_times)) if step_times else None,
               "placement": m.placement,
               "afd": {"micro_batches": plan.micro_batches,
                       "tokens_per_micro_batch": rows_per_mb,
                       "a2f_bytes_per_layer": per_layer["a2f"] * plan.micro_batches,
                       "f2a_bytes_per_layer": per_layer["f2a"] * plan.micro_batches,
                       "transfer_dtype": plan.transfer_dtype}}
    if profiled:
        metrics["afd"].update(summarize(profiled, cfg.num_hidden_layers))
        if keep_timeline:
            metrics["afd"]["timeline"] = profiled
    return results, metrics
