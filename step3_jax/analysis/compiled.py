"""The memory plan's cross-check: the real decode programs lowered and compiled with abstract
inputs, each one's ``compiled.memory_analysis()`` set beside the arithmetic of
:mod:`step3_jax.analysis.plan`.

The programs are lowered on as many emulated CPU devices as the placement has, with
``jax.ShapeDtypeStruct`` inputs carrying their shardings, so nothing is allocated. Colocated,
that is the whole decode loop (``generate._decode``). With AFD, it is each program the decode
step dispatches: the attention step of a dense and of an MoE layer, the FFN step of each, and
the LM head with sampling (``afd_schedule.next_tokens``, on one attention device, as
``afd.generate`` runs it). The comparison is like with like: float32 weights, KV and activations
and the ``loop`` kernel, which is what the CPU program holds. A process whose device count is
fixed too low runs the check in a child (``python -m step3_jax.analysis.compiled``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

import jax

from step3_jax.analysis.deployment import Placement, shards
from step3_jax.analysis.plan import (activations, attention_layer_bytes, head_bytes, max_batch,
                                     notes, plan, router_bytes)
from step3_jax.errors import Step3Error
from step3_jax.model import weights
from step3_jax.model.cache import layer_shapes
from step3_jax.model.config import Step3Config
from step3_jax.model.moe import per_expert_layout

# Above this many per-expert branches (MoE layers x experts) the colocated check's CPU loop kernel
# compiles for minutes (one switch branch per expert: ~6 s per 48-expert layer measured here), so
# --compiled-check auto skips it; ep > 1 (stacked experts) compiles in seconds at any size.
MAX_AUTO_EXPERT_BRANCHES = 256
COMPILED_CHECK_MODES = ("auto", "on", "off")


def _skip_reason(cfg: Step3Config, placement: Placement) -> str | None:
    branches = len(cfg.moe_layers) * cfg.moe_num_experts
    if (not placement.afd and per_expert_layout(cfg.replace(dtype="float32"), placement.ep)
            and branches > MAX_AUTO_EXPERT_BRANCHES):
        return (f"a colocated mesh with ep=1 compiles the CPU loop kernel's {branches} "
                f"per-expert branches (minutes); use --compiled-check on to force it, or ep > 1")
    return None

def plan_document(cfg: Step3Config, placement: Placement, *, batch: int, context: int,
                  weights_format: str, kv_dtype: str, device_memory: int,
                  compiled: str = "auto", log=None) -> dict:
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
    ``ep == 1``, as ``loader.load`` hands them over)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    if not per_expert_layout(cfg, ep):
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

    from step3_jax.model.sharding import make_mesh, param_shardings
    from step3_jax.runtime import afd_schedule

    A = placement.attention
    F = placement.ffn_ep * placement.ffn_tp
    ffn_mesh = make_mesh(ep=placement.ffn_ep, tp=placement.ffn_tp, devices=devices[A:A + F])
    dt = jnp.dtype(cfg.dtype)
    item = dt.itemsize
    rep_f = NamedSharding(ffn_mesh, P())
    one = SingleDeviceSharding(devices[0])  # each attention device runs its own program
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
        layer = jax.tree.map(lambda s: _sds(s.shape, dt, one), spec, is_leaf=weights.is_spec)
        layer = layer.replace(ffn=afd_schedule.RouterOnly(layer.ffn.router) if kind == "MoE"
                              else None)
        h = _sds((b, 1, H), dt, one)
        k_shape, v_shape = layer_shapes(cfg, b, context)
        kv = (_sds(k_shape, dt, one), _sds(v_shape, dt, one),
              _sds((b, 1), jnp.int32, one), _sds((b,), jnp.int32, one))
        compiled = afd_schedule.attention_step.lower(
            layer, h, h, _sds((b, 1), jnp.int32, one), *kv, cfg=cfg,
            transfer="float8_e4m3fn").compile()
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
            compiled = afd_schedule.ffn_step.lower(ffn, ((q, scale, routing),), cfg=cfg).compile()
        args = layer_weights("ffn", i) + rows * (H + 4) + (rows * k * 8 if kind == "MoE" else 0)
        temps = acts["ffn"]["moe_layer" if kind == "MoE" else "dense_layer"] + rows * H * item
        out.append(_program(f"FFN step ({kind} layer {i})", "ffn", compiled, args, temps))

    # The LM head and sampling: one program per attention device over all its micro-batches'
    # rows, on that device alone, as afd.generate runs it.
    head = decl.replace(layers=())
    head = jax.tree.map(lambda s: _sds(s.shape, dt, one), head, is_leaf=weights.is_spec)
    hs = tuple(_sds((b, 1, H), dt, one) for _ in range(m))
    key = jax.random.key_data(jax.random.PRNGKey(0))
    keys = _sds((m * b,) + key.shape, key.dtype, one)
    knobs = [_sds((), t, one) for t in (jnp.int32, jnp.float32, jnp.int32, jnp.float32)]
    compiled = afd_schedule.next_tokens.lower(head, hs, hs, _sds((m * b,), jnp.int32, one),
                                              keys, *knobs, cfg=cfg).compile()
    lm = [s for s in items if s.category in ("lm_head",) or s.spec.hub == "model.norm.weight"]
    if cfg.tie_word_embeddings:
        lm = [s for s in items if s.category == "embedding" or s.spec.hub == "model.norm.weight"]
    args = (sum(s.bytes("float32")[0] for s in lm) + 2 * m * b * H * item
            + m * b * (4 + key.size * key.dtype.itemsize) + 4 * 4)  # at, keys; step and knobs
    temps = head_bytes(cfg, m * b, item)
    out.append(_program("LM head and sampling (afd_schedule.next_tokens)", "attention", compiled,
                        args, temps))
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
    proc = subprocess.run([sys.executable, "-m", "step3_jax.analysis.compiled"], input=request,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Step3Error(f"the compiled check failed in its child process: {tail}")
    return json.loads(proc.stdout)


def _config_json(cfg: Step3Config) -> dict:
    return dataclasses.asdict(cfg)


def _config_from_json(raw: dict) -> Step3Config:
    return Step3Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def _child_main() -> int:
    """``python -m step3_jax.analysis.compiled``: the compiled check on this process's devices;
    JSON in on stdin, JSON out on stdout (used by :func:`compiled_check_subprocess`)."""
    request = json.loads(sys.stdin.read())
    cfg = _config_from_json(request["config"])
    placement = Placement(**request["placement"])
    out = compiled_check(cfg, placement, batch=request["batch"], context=request["context"])
    json.dump(out, sys.stdout)
    return 0

if __name__ == "__main__":
    sys.exit(_child_main())
