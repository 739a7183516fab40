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

The schedule is driven from Python, as real AFD deployments drive two sets of instances:
micro-batch after micro-batch, layer by layer, with nothing on the host waiting for a device
until the step's last token ids are read. Each device runs its queue in order, so the FFN group
works on micro-batch ``i`` while the attention group works on ``i + 1``. Two properties of
XLA:CPU shape it (``xla/pjrt/cpu/cpu_client.cc``): a program spanning several devices is
gang-scheduled and such programs run **one at a time across the whole client** ("only one
collective at a time"), so the attention group's data-parallel step runs as one single-device
program per attention device (they need no collective), leaving the FFN program the only
multi-device one; and a ``device_put`` from an array sharded over one mesh to a *replicated*
layout on another blocks the host until the source is ready, so every transfer here goes from
one device's array.

``generate`` measures one decode step with a ``jax.profiler`` trace (:func:`device_intervals`):
the XLA:CPU runtime stamps every HLO op it runs with its device and launch, which gives each
device's busy intervals from the executing threads themselves. :func:`summarize` turns them
into per-layer attention / FFN / transfer times, the bubble fraction and how long the two groups
were busy at once. Two control schedules keep the groups from overlapping: ``serial`` blocks the
host after every op, ``lockstep`` chains each attention launch to the previous FFN result on
device (no host round trips); comparing them with ``pipelined`` shows what overlap buys
(BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import shutil
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from step3_jax.model import decoder
from step3_jax.runtime import sampling
from step3_jax.model.cache import layer_shapes
from step3_jax.model.config import Step3Config
from step3_jax.errors import Step3Error
from step3_jax.runtime.generate import (FINISH_REASONS, MIN_PREFILL_BUCKET, GenerationResult, bucket,
                                check_prompts, shape_buckets)
from step3_jax.model.layers import rms_norm
from step3_jax.model.moe import resolve_impl, route
from step3_jax.model.sharding import axis_sizes, drop_first_axis, make_mesh, param_shardings
from step3_jax.model.weights import Moe, Params, stack_moe, unstack_moe

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
    attn, local = place_attention(params, attn_mesh)
    return AfdModel(cfg, plan, attn_mesh, ffn_mesh, attn, place_ffn(params, cfg, plan, devices),
                    local)


def place_attention(params: Params, attn_mesh) -> tuple[Params, tuple]:
    """The attention side: every weight but the FFNs' (routers kept), replicated on the group,
    and each device's single-device view of it."""
    layers = tuple(
        layer.replace(ffn=_RouterOnly(layer.ffn.router) if isinstance(layer.ffn, Moe) else None)
        for layer in params.layers)
    attn = jax.device_put(params.replace(layers=layers), NamedSharding(attn_mesh, P()))
    return attn, tuple(_on_device(attn, d) for d in attn_mesh.devices.flat)


def place_ffn(params: Params, cfg: Step3Config, plan: AfdPlan,
              devices: Sequence | None = None) -> tuple:
    """The FFN side: per layer the dense FFN, or the MoE without its router, split over the FFN
    group by the rules table (per-expert arrays for the CPU loop kernel when ``ep`` is 1)."""
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
    return tuple(ffn)


def _on_device(tree, device):
    """The single-device arrays that make up a replicated (or sharded) tree on ``device``."""
    def one(x):
        return next(s.data for s in x.addressable_shards if s.device == device)

    return jax.tree.map(one, tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _RouterOnly:
    router: jax.Array



# ----- the programs: single-device on each attention device, one over the FFN mesh ---------------

def _quantize(y, dtype: str):
    if dtype != "float8_e4m3fn":
        return y.astype(dtype), None
    amax = jnp.max(jnp.abs(y.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / _FP8_MAX, 1.0)
    return (y / scale).astype(jnp.float8_e4m3fn), scale


@functools.partial(jax.jit, static_argnames=("cfg", "transfer"),
                   donate_argnames=("k_cache", "v_cache"))
def _attention_step(layer, h, f, positions, k_cache, v_cache, slots, key_len, after=None, *,
                    cfg, transfer):
    """Residual add of the previous layer's FFN output, MFA, post-norm, router, quantize.

    ``k_cache``/``v_cache``: this layer's cache (donated: updated in place), or None (no cache).
    ``after``: arrays the step must wait for and otherwise ignores (the lockstep schedule).
    """
    x = h + f.astype(h.dtype)
    if after is not None:
        x, _ = jax.lax.optimization_barrier((x, after))
    kv = None if k_cache is None else (k_cache, v_cache, slots, key_len)
    with jax.named_scope("afd_attention"):
        h, new_kv = decoder.attention_block(layer, x, positions, kv, cfg)
        y = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
        routing = route(y, layer.ffn.router, cfg) if layer.ffn is not None else None
    with jax.named_scope("afd_send"):
        sent = (*_quantize(y, transfer), routing)
    new_k, new_v = (None, None) if new_kv is None else new_kv
    return h, new_k, new_v, sent


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ffn_step(ffn, pieces, *, cfg):
    """The FFN on the tokens of every attention device; ``pieces`` holds one ``(q, scale,
    routing)`` per attention device, and the result comes back split the same way, replicated
    over the FFN mesh (call under ``jax.set_mesh(ffn_mesh)``)."""
    rows = [q.shape[0] for q, _, _ in pieces]
    q = jnp.concatenate([q for q, _, _ in pieces])
    if pieces[0][1] is None:
        y = q.astype(cfg.dtype)
    else:
        scale = jnp.concatenate([s for _, s, _ in pieces])
        y = (q.astype(jnp.float32) * scale).astype(cfg.dtype)
    routing = None
    if pieces[0][2] is not None:
        routing = tuple(jnp.concatenate([r[i] for _, _, r in pieces]) for i in (0, 1))
    with jax.named_scope("afd_ffn"):
        out = decoder.ffn_block(ffn, y, cfg, routing)
    out = jax.lax.with_sharding_constraint(out, P())  # every FFN device can send any rows back
    return tuple(jnp.split(out, np.cumsum(rows)[:-1].tolist()))


@jax.jit
def _embed(embed, tokens):
    x = jnp.take(embed, tokens, axis=0)
    return x, jnp.zeros_like(x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(attn: Params, h, f, *, cfg):
    return decoder.logits_from_hidden(attn, h + f.astype(h.dtype), cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _next_tokens(attn: Params, hs, fs, at, keys, step, temperature, top_k, top_p, *, cfg):
    """One attention device's next tokens for all its micro-batches at once: the hidden state
    at position ``at`` of each row, the LM head (read once per step, not per micro-batch), and
    sampling with each row's key."""
    x = jnp.concatenate([h + f.astype(h.dtype) for h, f in zip(hs, fs)])
    x = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
    logits = decoder.logits_from_hidden(attn, x, cfg)
    return sampling.sample(logits, keys, step, temperature, top_k, top_p)


# ----- the schedule ------------------------------------------------------------------------------

SCHEDULES = ("pipelined", "serial", "lockstep")


@dataclasses.dataclass
class _Shard:
    """One attention device's rows of one micro-batch, with their KV cache on that device."""

    index: int                 # position of the device in the attention group
    device: jax.Device
    rows: slice                # rows of the whole (padded) batch
    k: list | None = None      # per layer [rows, head_dim, capacity] (cache.layer_shapes)
    v: list | None = None


def _new_cache(cfg: Step3Config, shard: _Shard, capacity: int) -> None:
    k_shape, v_shape = layer_shapes(cfg, shard.rows.stop - shard.rows.start, capacity)
    zeros = lambda shape: jnp.zeros(shape, cfg.dtype, device=shard.device)  # noqa: E731
    shard.k = [zeros(k_shape) for _ in range(cfg.num_hidden_layers)]
    shard.v = [zeros(v_shape) for _ in range(cfg.num_hidden_layers)]


def _slots(lengths: np.ndarray, num_new: np.ndarray, chunk: int, capacity: int) -> np.ndarray:
    """``cache.write_positions`` on the host: slot ``lengths[b] + t`` for ``t < num_new[b]``
    inside the capacity, else ``capacity`` (out of bounds: the scatter drops it)."""
    pos = lengths[:, None] + np.arange(chunk, dtype=np.int32)[None, :]
    ok = (np.arange(chunk)[None, :] < num_new[:, None]) & (pos < capacity)
    return np.where(ok, pos, capacity).astype(np.int32)


def _stack_pass(m: AfdModel, mbs: list[list[_Shard]], feeds: list[list[dict]],
                schedule: str = "pipelined"):
    """All layers for every micro-batch. ``feeds[j][s]`` holds shard ``mbs[j][s]``'s host inputs:
    ``tokens``, ``positions`` and, with a cache, ``slots`` and ``key_len`` (None in prefill).
    Returns ``(state, tail)``: the final ``(h, f)`` per shard, and per micro-batch the last
    layer's FFN outputs (one per shard) on the whole FFN group (empty with a remote FFN). Each
    shard copies its ``f`` from one FFN device, so when ``state`` is ready another FFN device may
    still be finishing: wait on ``tail`` too before tracing the next pass. The shards' caches are
    replaced by the updated ones (the old arrays are donated). Dispatch is labelled for
    :func:`device_intervals`.

    ``schedule``: ``pipelined`` (nothing waits on the host), ``serial`` (the host blocks after
    every op), or ``lockstep`` (nothing waits on the host, but each attention launch takes the
    previous FFN result from every FFN device as an input, so the groups take turns on the
    devices: the control that isolates what overlap buys from what host round trips cost)."""
    cfg, plan = m.cfg, m.plan
    if schedule not in SCHEDULES:
        raise Step3Error(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    sync = jax.block_until_ready if schedule == "serial" else (lambda x: x)
    last_back = {}  # attention device index -> what its next launch waits for (lockstep)
    to_ffn = NamedSharding(m.ffn_mesh, P())
    ffn_devices = m.ffn_devices
    put = lambda x, d: None if x is None else jax.device_put(x, d)  # noqa: E731
    ins = [[{k: put(v, sh.device) for k, v in feed.items()} for sh, feed in zip(shards, fs)]
           for shards, fs in zip(mbs, feeds)]
    state = [[sync(_embed(m.local[sh.index].embed, x["tokens"])) for sh, x in zip(shards, xs)]
             for shards, xs in zip(mbs, ins)]
    if m.remote is not None:  # the FFN process(es) learn this pass's shapes (distributed.py)
        m.remote.begin_pass([[x["tokens"].shape for x in xs] for xs in feeds])
    tail = []
    for i in range(cfg.num_hidden_layers):
        for j, shards in enumerate(mbs):  # micro-batch j's FFN overlaps micro-batch j+1's MFA
            pieces = []
            with jax.profiler.TraceAnnotation(f"afd/attention/{i}/{j}"):
                for s, (sh, x) in enumerate(zip(shards, ins[j])):
                    h, f = state[j][s]
                    cached = sh.k is not None
                    h, k, v, sent = sync(_attention_step(
                        m.local[sh.index].layers[i], h, f, x["positions"],
                        sh.k[i] if cached else None, sh.v[i] if cached else None,
                        x.get("slots"), x.get("key_len"),
                        last_back.get(sh.index) if schedule == "lockstep" else None,
                        cfg=cfg, transfer=plan.transfer_dtype))
                    if cached:
                        sh.k[i], sh.v[i] = k, v
                    state[j][s] = [h, None]
                    pieces.append(sent)
            if m.remote is not None:  # A->F, FFN and F->A through the FFN process(es)
                for s, out in enumerate(m.remote.exchange(i, j, pieces, shards)):
                    state[j][s][1] = sync(out)
                continue
            with jax.profiler.TraceAnnotation(f"afd/a2f/{i}/{j}"):
                pieces = [sync(jax.device_put(p, to_ffn)) for p in pieces]
            with jax.profiler.TraceAnnotation(f"afd/ffn/{i}/{j}"), jax.set_mesh(m.ffn_mesh):
                outs = sync(_ffn_step(m.ffn[i], tuple(pieces), cfg=cfg))
            if i == cfg.num_hidden_layers - 1:
                tail.append(outs)
            with jax.profiler.TraceAnnotation(f"afd/f2a/{i}/{j}"):
                for s, (sh, out) in enumerate(zip(shards, outs)):
                    src = ffn_devices[sh.index % len(ffn_devices)]  # spread the sends
                    piece = next(p.data for p in out.addressable_shards if p.device == src)
                    state[j][s][1] = sync(jax.device_put(piece, sh.device))
                    if schedule == "lockstep":  # every FFN device's copy: all of them finished
                        last_back[sh.index] = [jax.device_put(p.data, sh.device)
                                               for p in out.addressable_shards]
    return state, tail


# ----- the measurement: per-device execution intervals from a profiler trace ---------------------

_log = logging.getLogger(__name__)


def _trace_options():
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # Python-function events would slow the host dispatch down
    return opts


def traced(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), trace)``: the call run under a ``jax.profiler`` trace, its outputs
    awaited; ``trace`` is None when a trace cannot be taken (another one is running)."""
    log_dir = tempfile.mkdtemp(prefix="step3_afd_trace_")
    try:
        try:
            jax.profiler.start_trace(log_dir, profiler_options=_trace_options())
        except RuntimeError as e:  # "Profile has already been started": the caller's own trace
            _log.warning("AFD stage metrics skipped: %s", e)
            return jax.block_until_ready(fn(*args, **kwargs)), None
        try:
            out = jax.block_until_ready(fn(*args, **kwargs))
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
        return out, (jax.profiler.ProfileData.from_file(files[0]) if files else None)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def device_intervals(trace, m: AfdModel, micro_batches: int) -> list[dict] | None:
    """Each device's program executions in a traced :func:`_stack_pass`, labelled.

    XLA:CPU emits one trace event per HLO op it executes, on the thread executing it, with the
    stats ``hlo_module``, ``device_ordinal`` (the global device id) and ``run_id`` (one launch).
    A launch on a device spans its first op's start to its last op's end. Each device runs its
    programs in dispatch order, so the ``k``-th ``_attention_step`` launch on an attention device
    is layer ``k // micro_batches``, micro-batch ``k % micro_batches`` (likewise ``_ffn_step``
    on each FFN device). Returns dicts ``group, device, kind, layer, mb, start, end, issued``
    (seconds from the first launch; ``issued``: when the host dispatched that stage, from the
    ``afd/...`` annotations), or None if the trace does not hold exactly the expected launches.
    """
    launches: dict[tuple, list] = {}
    marks: dict[str, int] = {}
    for plane in trace.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name.startswith("afd/"):
                    marks[ev.name] = ev.start_ns
                    continue
                stats = dict(ev.stats)
                module = stats.get("hlo_module")
                if module is None or "device_ordinal" not in stats or "run_id" not in stats:
                    continue
                key = (int(stats["device_ordinal"]), int(stats["run_id"]), str(module))
                span = launches.setdefault(key, [ev.start_ns, ev.start_ns + ev.duration_ns])
                span[0] = min(span[0], ev.start_ns)
                span[1] = max(span[1], ev.start_ns + ev.duration_ns)
    layers = m.cfg.num_hidden_layers
    out = []
    for group, devices, program in (("attention", m.attn_devices, "_attention_step"),
                                    ("ffn", m.ffn_devices, "_ffn_step")):
        for d in devices:
            runs = sorted(span for (dev, _, module), span in launches.items()
                          if dev == d.id and module.endswith(program))
            if len(runs) != layers * micro_batches:
                _log.warning("AFD trace: %d %s launches on device %d, expected %d; no stage "
                             "metrics", len(runs), program, d.id, layers * micro_batches)
                return None
            for k, (a, b) in enumerate(runs):
                i, j = divmod(k, micro_batches)
                out.append({"group": group, "device": d.id, "kind": group, "layer": i, "mb": j,
                            "start": a, "end": b,
                            "issued": marks.get(f"afd/{group}/{i}/{j}", a)})
    t0 = min(iv["start"] for iv in out)
    for iv in out:
        for key in ("start", "end", "issued"):
            iv[key] = (iv[key] - t0) * 1e-9
    return out


def _union(spans):
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _length(spans) -> float:
    return sum(b - a for a, b in spans)


def _intersect(xs, ys) -> float:
    return sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in xs for a2, b2 in ys)


def summarize(intervals: list[dict], layers: int,
              lockstep: bool = False) -> tuple[dict, list[dict]]:
    """Stage metrics of one step from :func:`device_intervals`, and the transfer waits.

    * ``attention_ms_per_layer`` / ``ffn_ms_per_layer``: one device's busy time per layer
      (summed over micro-batches, averaged over the group's devices);
    * ``transfer_ms_per_layer``: per layer, how long stages waited for their input after its
      producer had finished, their own group was free and the host had issued them — the A→F and
      F→A copies plus the runtime's scheduling, as far as they stall the pipeline;
    * ``dispatch_wait_ms_per_layer``: how long stages waited for the host to issue them after
      their input and group were ready (the Python-driven schedule's own cost);
    * ``bubble_fraction``: ``1 - (A busy + F busy) / (2 x step)``, a group busy while any of its
      devices runs a stage; ``overlap_ms``: how long both groups were busy at once.

    A stage (group, layer, micro-batch) spans its devices' first start to last end. With
    ``lockstep`` an attention stage also waits for the FFN stage dispatched before it.
    """
    busy = {g: _union((iv["start"], iv["end"]) for iv in intervals if iv["group"] == g)
            for g in ("attention", "ffn")}
    wall = max(iv["end"] for iv in intervals) - min(iv["start"] for iv in intervals)
    stage: dict[tuple, dict] = {}
    for iv in intervals:
        key = (iv["group"], iv["layer"], iv["mb"])
        st = stage.setdefault(key, {"start": iv["start"], "end": iv["end"],
                                    "issued": iv["issued"]})
        st["start"], st["end"] = min(st["start"], iv["start"]), max(st["end"], iv["end"])
    order = {g: sorted(k[1:] for k in stage if k[0] == g) for g in ("attention", "ffn")}
    waits, transfer, dispatch = [], 0.0, 0.0
    for g, other, kind in (("ffn", "attention", "a2f"), ("attention", "ffn", "f2a")):
        for n, (i, j) in enumerate(order[g]):
            srcs = [(other, i, j)] if g == "ffn" else [(other, i - 1, j)]
            if g == "attention" and lockstep and n:  # the FFN stage dispatched just before
                srcs.append((other, *order[g][n - 1]))
            srcs = [x for x in srcs if x in stage]
            if not srcs:  # the first layer's attention reads the embedding
                continue
            st = stage[(g, i, j)]
            ready = max(stage[x]["end"] for x in srcs)
            if n:
                ready = max(ready, stage[(g, *order[g][n - 1])]["end"])
            dispatch += max(0.0, st["issued"] - ready)
            ready = max(ready, st["issued"])
            if st["start"] > ready:
                transfer += st["start"] - ready
                waits.append({"group": "transfer", "device": None, "kind": kind, "layer": i,
                              "mb": j, "start": ready, "end": st["start"]})
    per_device = {g: len({iv["device"] for iv in intervals if iv["group"] == g})
                  for g in ("attention", "ffn")}
    stage_ms = {g: 1e3 * sum(iv["end"] - iv["start"] for iv in intervals if iv["group"] == g)
                / (per_device[g] * layers) for g in ("attention", "ffn")}
    return {"attention_ms_per_layer": stage_ms["attention"], "ffn_ms_per_layer": stage_ms["ffn"],
            "transfer_ms_per_layer": 1e3 * transfer / layers,
            "dispatch_wait_ms_per_layer": 1e3 * dispatch / layers,
            "step_ms": 1e3 * wall,
            "bubble_fraction": (1.0 - (_length(busy["attention"]) + _length(busy["ffn"]))
                                / (2 * wall)) if wall > 0 else 0.0,
            "overlap_ms": 1e3 * _intersect(busy["attention"], busy["ffn"])}, waits


# ----- score and generate ------------------------------------------------------------------------

def score(m: AfdModel, ids: Sequence[int]) -> list[float]:
    """``log p(ids[i] | ids[:i])`` through the disaggregated data path (one sequence, on the
    first attention device)."""
    (ids,) = check_prompts([ids], m.cfg)
    tokens = np.zeros((1, bucket(len(ids), MIN_PREFILL_BUCKET)), np.int32)
    tokens[0, : len(ids)] = ids
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    shard = _Shard(0, m.attn_devices[0], slice(0, 1))
    [[(h, f)]], _ = _stack_pass(m, [[shard]], [[{"tokens": tokens, "positions": positions}]])
    logp = jax.nn.log_softmax(_logits(m.local[0], h, f, cfg=m.cfg)[0], axis=-1)
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
    :func:`device_intervals`; ``keep_timeline`` adds its intervals (seconds). The trace costs
    ~10-100 ms. ``decode_step_ms`` is the median wall time of the later, unprofiled steps
    (None with fewer than 4 new tokens); ``prefill_ms`` includes compiling on a first call.
    ``schedule``: ``"serial"`` and ``"lockstep"`` are the controls for the overlap measurement
    (see :func:`_stack_pass`).
    """
    cfg, plan = m.cfg, m.plan
    prompts = check_prompts(prompts, cfg)
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
    mbs = [[_Shard(a, devices[a], slice(j * rows_per_mb + a * r, j * rows_per_mb + (a + 1) * r))
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
            drawn.append(_next_tokens(m.local[a], tuple(flat[k][0] for k in ks),
                                      tuple(flat[k][1] for k in ks), at, keys[a],
                                      np.int32(step), *knobs, cfg=cfg))
        tokens = np.zeros(batch, np.int32)
        for rows, t in zip(rows_of, drawn):
            tokens[rows] = np.asarray(t)
        return tokens

    # Prefill: attention within each prompt chunk, K/V written into a fresh cache per shard.
    feeds = []
    for sh in shards:
        _new_cache(cfg, sh, capacity)
        feeds.append({"tokens": tokens[sh.rows],
                      "positions": np.broadcast_to(np.arange(chunk, dtype=np.int32),
                                                   (r, chunk)).copy(),
                      "slots": _slots(np.zeros(r, np.int32), lengths[sh.rows], chunk, capacity)})
    started = time.perf_counter()
    state, tail = _stack_pass(m, mbs, _by_mb(feeds, A), schedule)
    next_tok = draw(state, 0, last=lengths)
    prefill_s = time.perf_counter() - started
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
    step_times: list[float] = []
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
        started = time.perf_counter()
        feed = (~done).astype(np.int32)
        feeds = [{"tokens": next_tok[sh.rows][:, None], "positions": cur[sh.rows][:, None],
                  "slots": _slots(cur[sh.rows], feed[sh.rows], 1, capacity),
                  "key_len": np.minimum(cur[sh.rows] + feed[sh.rows], capacity)}
                 for sh in shards]
        if step == profile_step:  # the trace must hold this pass's launches and no others
            jax.block_until_ready(tail)
            (state, tail), trace = traced(_stack_pass, m, mbs, _by_mb(feeds, A), schedule)
            profiled = trace and device_intervals(trace, m, plan.micro_batches)
        else:
            state, tail = _stack_pass(m, mbs, _by_mb(feeds, A), schedule)
        cur = np.minimum(cur + feed, capacity)
        next_tok = np.where(done, next_tok, draw(state, step))
        if step > 1 and step != profile_step:
            step_times.append(time.perf_counter() - started)  # compiled, unprofiled steps
    results = [GenerationResult(prompt_ids=p, generated_ids=out[b],
                                finish_reason=FINISH_REASONS[reason[b]])
               for b, p in enumerate(prompts)]
    per_layer = m.transfer_bytes_per_layer(rows_per_mb)
    metrics = {"batch": n, "mesh": {"attention": {"dp": A},
                                    "ffn": {"ep": plan.ffn_ep, "tp": plan.ffn_tp}},
               "prefill_bucket": chunk, "cache_capacity": capacity, "decode_steps": step,
               "generated_tokens": sum(len(out[b]) for b in range(n)),
               "prefill_ms": 1e3 * prefill_s,
               "decode_step_ms": 1e3 * float(np.median(step_times)) if step_times else None,
               "backend": jax.default_backend(), "dtype": cfg.dtype,
               "placement": m.placement,
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


def _by_mb(feeds: list, per_mb: int) -> list[list]:
    return [feeds[k: k + per_mb] for k in range(0, len(feeds), per_mb)]
