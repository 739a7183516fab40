"""AFD's device programs and its micro-batch schedule (:mod:`step3_jax.runtime.afd` places the
weights and drives them).

The programs: per attention device, one single-device :func:`attention_step` per layer (the
previous FFN output added, MFA with its donated K/V cache, post-norm, router, the FP8 send); over
the FFN mesh, one :func:`ffn_step` per layer for every attention device's tokens; and
:func:`next_tokens`, the LM head and sampling of a device's micro-batches at once.

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
from step3_jax.model import decoder
from step3_jax.model.cache import layer_shapes
from step3_jax.model.config import Step3Config
from step3_jax.model.layers import rms_norm
from step3_jax.model.moe import route
from step3_jax.model.weights import Params
from step3_jax.runtime import sampling

_FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RouterOnly:
    """An MoE layer's FFN as the attention side holds it: the router alone."""

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
def attention_step(layer, h, f, positions, k_cache, v_cache, slots, key_len, after=None,
                   table=None, *, cfg, transfer):
    """Residual add of the previous layer's FFN output, MFA, post-norm, router, quantize.

    ``k_cache``/``v_cache``: this layer's cache (donated: updated in place), or None (no cache).
    ``after``: arrays the step must wait for and otherwise ignores (the lockstep schedule).
    ``table``: the rows' page tables when ``k_cache``/``v_cache`` are page pools (the engine).
    """
    x = h + f.astype(h.dtype)
    if after is not None:
        x, _ = jax.lax.optimization_barrier((x, after))
    kv = None if k_cache is None else (k_cache, v_cache, slots, key_len)
    if table is not None:
        kv = (*kv, table)
    with jax.named_scope("afd_attention"):
        h, new_kv = decoder.attention_block(layer, x, positions, kv, cfg)
        y = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
        routing = route(y, layer.ffn.router, cfg) if layer.ffn is not None else None
    with jax.named_scope("afd_send"):
        sent = (*_quantize(y, transfer), routing)
    new_k, new_v = (None, None) if new_kv is None else new_kv
    return h, new_k, new_v, sent


@functools.partial(jax.jit, static_argnames=("cfg",))
def ffn_step(ffn, pieces, *, cfg):
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
def embed_tokens(embed, tokens):
    x = jnp.take(embed, tokens, axis=0)
    return x, jnp.zeros_like(x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def logits(attn: Params, h, f, *, cfg):
    return decoder.logits_from_hidden(attn, h + f.astype(h.dtype), cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def next_tokens(attn: Params, hs, fs, at, keys, step, temperature, top_k, top_p, *, cfg):
    """One attention device's next tokens for all its micro-batches at once: the hidden state
    at position ``at`` of each row, the LM head (read once per step, not per micro-batch), and
    sampling with each row's key (``step`` and the knobs: scalars, or one per row as the
    engine passes them; :func:`sampling.sample`)."""
    x = jnp.concatenate([h + f.astype(h.dtype) for h, f in zip(hs, fs)])
    x = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
    logits = decoder.logits_from_hidden(attn, x, cfg)
    return sampling.sample(logits, keys, step, temperature, top_k, top_p)


# ----- the schedule ------------------------------------------------------------------------------

SCHEDULES = ("pipelined", "serial", "lockstep")


@dataclasses.dataclass
class Shard:
    """One attention device's rows of one micro-batch, with their KV cache on that device."""

    index: int                 # position of the device in the attention group
    device: jax.Device
    rows: slice                # rows of the whole (padded) batch
    k: list | None = None      # per layer [rows, head_dim, capacity] (cache.layer_shapes)
    v: list | None = None


def new_cache(cfg: Step3Config, shard: Shard, capacity: int) -> None:
    k_shape, v_shape = layer_shapes(cfg, shard.rows.stop - shard.rows.start, capacity)
    zeros = lambda shape: jnp.zeros(shape, cfg.dtype, device=shard.device)  # noqa: E731
    shard.k = [zeros(k_shape) for _ in range(cfg.num_hidden_layers)]
    shard.v = [zeros(v_shape) for _ in range(cfg.num_hidden_layers)]


def slots(lengths: np.ndarray, num_new: np.ndarray, chunk: int, capacity: int) -> np.ndarray:
    """``cache.write_positions`` on the host: slot ``lengths[b] + t`` for ``t < num_new[b]``
    inside the capacity, else ``capacity`` (out of bounds: the scatter drops it)."""
    pos = lengths[:, None] + np.arange(chunk, dtype=np.int32)[None, :]
    ok = (np.arange(chunk)[None, :] < num_new[:, None]) & (pos < capacity)
    return np.where(ok, pos, capacity).astype(np.int32)


def stack_pass(m, mbs: list[list[Shard]], feeds: list[list[dict]],
                schedule: str = "pipelined"):
    """All layers for every micro-batch. ``feeds[j][s]`` holds shard ``mbs[j][s]``'s host inputs:
    ``tokens``, ``positions`` and, with a cache, ``slots`` and ``key_len`` (None in prefill), and
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
                        x.get("table"), cfg=cfg, transfer=plan.transfer_dtype))
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
                outs = sync(ffn_step(m.ffn[i], tuple(pieces), cfg=cfg))
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
