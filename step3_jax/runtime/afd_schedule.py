"""AFD's device programs and its micro-batch schedule (:mod:`step3_jax.runtime.afd` places the
weights and drives them).

The programs: per attention device, one single-device :func:`attention_step` per layer (the
previous FFN output added, MFA with its donated K/V cache, post-norm, router, the FP8 send); over
the FFN mesh, one :func:`ffn_step` per layer for every attention device's tokens; and
:func:`next_tokens`, the LM head and sampling of a device's micro-batches at once. Either model
family runs (:mod:`step3_jax.model.family`): a Step-3.5 layer's attention half is
``step35.attention_block`` (GQA over its own cache: the whole context on full layers, a ring of
``window`` slots on sliding ones, slots derived on device from the rows' lengths exactly as the
colocated decoder does), its router the biased sigmoid one, and its FFN half ``step35.ffn_block``
with the layer's clamps, so the programs take a layer index (static) for its
:class:`~step3_jax.model.step35_config.LayerSpec`: the first layer of the same kind
(:func:`program_layer`), so that layers alike share one program.

The schedule (:func:`stack_pass`) is driven from Python, as real AFD deployments drive two sets
of instances: micro-batch after micro-batch, layer by layer, with nothing on the host waiting for
a device until the step's last token ids are read. Each device runs its queue in order, so the
FFN group works on micro-batch ``i`` while the attention group works on ``i + 1``. Two properties
of XLA:CPU shape it (``xla/pjrt/cpu/cpu_client.cc``): a program spanning several devices is
gang-scheduled and such programs run **one at a time across the whole client** ("only one
collective at a time"), so the attention group's data-parallel step runs as one single-device
program per attention device (they need no collective), leaving the FFN program the only
multi-device one; and a ``device_put`` from an array sharded over one mesh to a *replicated*
layout on another blocks the host until the source is ready, so every transfer here goes from
one device's array. Two control schedules keep the groups from overlapping: ``serial`` blocks
the host after every op, ``lockstep`` chains each attention launch to the previous FFN result on
device (no host round trips).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from step3_jax.errors import Step3Error
from step3_jax.model import decoder, family, step35
from step3_jax.model.cache import layer_shapes
from step3_jax.model.layers import rms_norm
from step3_jax.model.moe import route
from step3_jax.model.step35_layers import route as route35
from step3_jax.model.step35_reader import AnyConfig
from step3_jax.model.weights import Params
from step3_jax.runtime import sampling

_FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RouterOnly:
    """An MoE layer's FFN as the attention side holds it: the router alone (with, on Step-3.5,
    its float32 selection bias)."""

    router: jax.Array
    router_bias: jax.Array | None = None


# What each program reads of a Step-3.5 layer's spec: layers that agree on these run one program.
ATTENTION_FIELDS = ("attention", "q_heads", "kv_heads", "head_dim", "window", "rope_theta",
                    "rotary_dim", "rope_scaling")
FFN_FIELDS = ("moe", "swiglu_limit", "swiglu_limit_shared")


def program_layer(cfg: AnyConfig, i: int, fields: tuple[str, ...]) -> int | None:
    """The static layer index of layer ``i``'s attention (``fields``: :data:`ATTENTION_FIELDS`)
    or FFN (:data:`FFN_FIELDS`) program: for Step-3.5 the first layer whose spec agrees with
    ``i``'s on ``fields`` (Step-3.5-Flash's 45 layers need 4 attention programs, not 45; the
    weights' shapes and the router's presence are the pytree's, not the spec's); None for
    Step-3, whose layers share one program."""
    if not family.is_step35(cfg):
        return None
    key = lambda j: tuple(getattr(cfg.layer(j), f) for f in fields)  # noqa: E731
    return next(j for j in range(i + 1) if key(j) == key(i))


# ----- the programs: single-device on each attention device, one over the FFN mesh ---------------

def _quantize(y, dtype: str):
    if dtype != "float8_e4m3fn":
        return y.astype(dtype), None
    amax = jnp.max(jnp.abs(y.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / _FP8_MAX, 1.0)
    return (y / scale).astype(jnp.float8_e4m3fn), scale


def _attention_half(layer, x, positions, k_cache, v_cache, slots, key_len, table, lengths,
                    num_new, cfg, index):
    """``h`` (the residual stream after attention), the FFN's input ``y``, the routing
    ``(weights, idx) [B, T, k]`` (None on a dense layer) and the updated cache, per family."""
    if family.is_step35(cfg):
        kv = None if k_cache is None else (k_cache, v_cache, lengths, num_new)
        h, new_kv = step35.attention_block(layer, x, positions, cfg.layer(index), cfg, kv)
        y = step35.post_norm(layer, h, cfg)
        routing = None
        if layer.ffn is not None:
            weights, idx = route35(y.reshape(-1, y.shape[-1]), layer.ffn, cfg)
            routing = (weights.reshape(*y.shape[:-1], -1), idx.reshape(*y.shape[:-1], -1))
        return h, y, routing, new_kv
    kv = None if k_cache is None else (k_cache, v_cache, slots, key_len)
    if table is not None:
        kv = (*kv, table)
    h, new_kv = decoder.attention_block(layer, x, positions, kv, cfg)
    y = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
    routing = route(y, layer.ffn.router, cfg) if layer.ffn is not None else None
    return h, y, routing, new_kv


@functools.partial(jax.jit, static_argnames=("cfg", "transfer", "index"),
                   donate_argnames=("k_cache", "v_cache"))
def attention_step(layer, h, f, positions, k_cache, v_cache, slots, key_len, after=None,
                   table=None, lengths=None, num_new=None, *, cfg, transfer, index=None):
    """Residual add of the previous layer's FFN output, attention, post-norm, router, quantize.

    ``k_cache``/``v_cache``: this layer's cache (donated: updated in place), or None (no cache).
    ``after``: arrays the step must wait for and otherwise ignores (the lockstep schedule).
    ``table``: the rows' page tables when ``k_cache``/``v_cache`` are page pools (the engine).
    Step-3 writes this chunk's K/V at the host-computed ``slots`` and reads ``key_len`` slots;
    Step-3.5 (``index``: :func:`program_layer`'s) takes the rows' cached ``lengths [B]`` (None:
    an empty cache, the prefill) and ``num_new [B]`` instead, as ``step35.layer`` does
    (``slots``, ``key_len`` None).
    """
    x = h + f.astype(h.dtype)
    if after is not None:
        x, _ = jax.lax.optimization_barrier((x, after))
    with jax.named_scope("afd_attention"):
        h, y, routing, new_kv = _attention_half(layer, x, positions, k_cache, v_cache, slots,
                                                key_len, table, lengths, num_new, cfg, index)
    with jax.named_scope("afd_send"):
        sent = (*_quantize(y, transfer), routing)
    new_k, new_v = (None, None) if new_kv is None else new_kv
    return h, new_k, new_v, sent


@functools.partial(jax.jit, static_argnames=("cfg", "index"))
def ffn_step(ffn, pieces, *, cfg, index=None):
    """The FFN on the tokens of every attention device; ``pieces`` holds one ``(q, scale,
    routing)`` per attention device, and the result comes back split the same way, replicated
    over the FFN mesh (call under ``jax.set_mesh(ffn_mesh)``). ``index``: for a Step-3.5 config,
    :func:`program_layer`'s (the layer's clamps)."""
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
        if family.is_step35(cfg):
            out = step35.ffn_block(ffn, y, cfg.layer(index), cfg, routing)
        else:
            out = decoder.ffn_block(ffn, y, cfg, routing)
    out = jax.lax.with_sharding_constraint(out, P())  # every FFN device can send any rows back
    return tuple(jnp.split(out, np.cumsum(rows)[:-1].tolist()))


@jax.jit
def embed_tokens(embed, tokens):
    x = jnp.take(embed, tokens, axis=0)
    return x, jnp.zeros_like(x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def logits(attn: Params, h, f, *, cfg):
    return family.of(cfg).decoder.logits_from_hidden(attn, h + f.astype(h.dtype), cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def next_tokens(attn: Params, hs, fs, at, keys, step, temperature, top_k, top_p, *, cfg):
    """One attention device's next tokens for all its micro-batches at once: the hidden state
    at position ``at`` of each row, the LM head (read once per step, not per micro-batch), and
    sampling with each row's key (``step`` and the knobs: scalars, or one per row as the
    engine passes them; :func:`sampling.sample`)."""
    x = jnp.concatenate([h + f.astype(h.dtype) for h, f in zip(hs, fs)])
    x = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
    logits = family.of(cfg).decoder.logits_from_hidden(attn, x, cfg)
    return sampling.sample(logits, keys, step, temperature, top_k, top_p)


# ----- the schedule ------------------------------------------------------------------------------

SCHEDULES = ("pipelined", "serial", "lockstep")


@dataclasses.dataclass
class Shard:
    """One attention device's rows of one micro-batch, with their KV cache on that device."""

    index: int                 # position of the device in the attention group
    device: jax.Device
    rows: slice                # rows of the whole (padded) batch
    k: list | None = None      # per layer: Step-3 [rows, head_dim, capacity]; Step-3.5
    v: list | None = None      # [rows, S_i, G, d] (S_i: capacity, or the ring on sliding layers)


def new_cache(cfg: AnyConfig, shard: Shard, capacity: int) -> None:
    """Zeroed per-layer K/V arrays of ``capacity`` positions for ``shard``'s rows, on its
    device: Step-3's ``cache.layer_shapes``, Step-3.5's ``step35.layer_shapes`` (a ring on
    sliding layers)."""
    rows = shard.rows.stop - shard.rows.start
    if family.is_step35(cfg):
        shapes = [(s, s) for s in step35.layer_shapes(cfg, rows, capacity)]
    else:
        shapes = [layer_shapes(cfg, rows, capacity)] * cfg.num_hidden_layers
    zeros = lambda shape: jnp.zeros(shape, cfg.dtype, device=shard.device)  # noqa: E731
    shard.k = [zeros(k) for k, _ in shapes]
    shard.v = [zeros(v) for _, v in shapes]


def slots(lengths: np.ndarray, num_new: np.ndarray, chunk: int, capacity: int) -> np.ndarray:
    """``cache.write_positions`` on the host: slot ``lengths[b] + t`` for ``t < num_new[b]``
    inside the capacity, else ``capacity`` (out of bounds: the scatter drops it)."""
    pos = lengths[:, None] + np.arange(chunk, dtype=np.int32)[None, :]
    ok = (np.arange(chunk)[None, :] < num_new[:, None]) & (pos < capacity)
    return np.where(ok, pos, capacity).astype(np.int32)


def cache_feed(cfg: AnyConfig, lengths: np.ndarray | None, num_new: np.ndarray, chunk: int,
               capacity: int) -> dict:
    """The cache inputs of a :func:`stack_pass` feed for rows holding ``lengths`` tokens (None:
    a fresh cache, the prefill) taking ``num_new`` of ``chunk`` new ones: Step-3's host-computed
    ``slots`` (and ``key_len`` after the prefill), Step-3.5's ``lengths`` and ``num_new`` (its
    per-layer slots are derived on device, as in the colocated decoder)."""
    num_new = np.asarray(num_new, np.int32)
    if family.is_step35(cfg):
        return {"num_new": num_new} | ({} if lengths is None else
                                       {"lengths": np.asarray(lengths, np.int32)})
    if lengths is None:
        return {"slots": slots(np.zeros_like(num_new), num_new, chunk, capacity)}
    return {"slots": slots(lengths, num_new, chunk, capacity),
            "key_len": np.minimum(lengths + num_new, capacity)}


def stack_pass(m, mbs: list[list[Shard]], feeds: list[list[dict]],
                schedule: str = "pipelined"):
    """All layers for every micro-batch. ``feeds[j][s]`` holds shard ``mbs[j][s]``'s host inputs:
    ``tokens``, ``positions`` and, with a cache, :func:`cache_feed`'s inputs (Step-3: ``slots``
    and ``key_len``, None in prefill; Step-3.5: ``lengths``, None in prefill, and ``num_new``), and
    with a paged cache (the engine: the shard's ``k``/``v`` are its device's page pools, shared
    by its micro-batches) ``table``.
    Returns ``(state, tail)``: the final ``(h, f)`` per shard, and per micro-batch the last
    layer's FFN outputs (one per shard) on the whole FFN group (empty with a remote FFN). Each
    shard copies its ``f`` from one FFN device, so when ``state`` is ready another FFN device may
    still be finishing: wait on ``tail`` too before tracing the next pass. The shards' caches are
    replaced by the updated ones (the old arrays are donated). Dispatch is labelled for
    ``afd_trace.device_intervals``.

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
    attn_index = [program_layer(cfg, i, ATTENTION_FIELDS) for i in range(cfg.num_hidden_layers)]
    ffn_index = [program_layer(cfg, i, FFN_FIELDS) for i in range(cfg.num_hidden_layers)]
    put = lambda x, d: None if x is None else jax.device_put(x, d)  # noqa: E731
    ins = [[{k: put(v, sh.device) for k, v in feed.items()} for sh, feed in zip(shards, fs)]
           for shards, fs in zip(mbs, feeds)]
    state = [[sync(embed_tokens(m.local[sh.index].embed, x["tokens"])) for sh, x in zip(shards, xs)]
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
                    h, k, v, sent = sync(attention_step(
                        m.local[sh.index].layers[i], h, f, x["positions"],
                        sh.k[i] if cached else None, sh.v[i] if cached else None,
                        x.get("slots"), x.get("key_len"),
                        last_back.get(sh.index) if schedule == "lockstep" else None,
                        x.get("table"), x.get("lengths"), x.get("num_new"), cfg=cfg,
                        transfer=plan.transfer_dtype, index=attn_index[i]))
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
                outs = sync(ffn_step(m.ffn[i], tuple(pieces), cfg=cfg, index=ffn_index[i]))
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
