#!/usr/bin/env python3
"""Step-3.5 beside Step-3 on this CPU: the decode step against context and batch (what the
sliding window saves), and long-context prefill tokens/s.

Models: the ``step35-bench`` preset (hidden 1024, 8 layers: full attention on 0 and 4, a
512-token window on the other 6, 2 K/V heads of 128; 288 experts top-8 + a shared expert) and
Step-3's ``bench`` preset (10 layers of MFA, one K/V head of 128 shared by 16 query heads; 48
experts top-3 + a shared expert), both ``max_position_embeddings`` 65536, float32, seeded random
weights, in the MoE kernel's layout (``moe.per_expert_layout``: per-expert arrays for the CPU
loop kernel). Both families run through the same code here: their ``decoder.forward`` (via
``model.family``) with ``cfg.attention_impl`` / ``moe_impl`` ``auto``.

1. Roofline: ``runtime.bench.roofline`` (a float32 ``[1, 8192] x [8192, 8192]`` matvec), before
   and after each decode point; the point uses their mean.
2. Decode: per (context, batch, family), a KV cache of capacity ``context + steps`` filled with
   made-up values up to ``context`` (no prefill: 32K tokens of it would take most of the budget),
   then a jitted ``fori_loop`` of ``--steps`` greedy steps, the cache donated; rows start from
   their own random tokens (so they route to different experts). Step = best of ``--repeats``
   runs / steps, each run after a cache flush. Bytes per step = what the batch must read: every
   non-expert weight once (the embedding: one row per sequence), the routed experts at the
   expected distinct count of uniform routing (``bench.expected_distinct_experts``), and the KV
   each layer keeps at the mean context of the run: Step-3's every position on every layer;
   Step-3.5's every position on full layers, ``min(context, window)`` on sliding ones
   (``Step35Config.kv_positions``). Roofline fraction = bytes / step / peak.
3. Prefill: one random prompt of each ``--prefill`` length, ``--prefill-chunk`` tokens at a time
   through ``forward`` over a cache (the chunk program compiled once, cache donated), on each
   model cut to its first ``--prefill-layers`` layers (default 4: Step-3.5's full + 3 sliding,
   Step-3's dense + 3 MoE; the whole models' 32K prefill would not fit the time budget).
   Tokens/s = length / wall time of one run after a compiling run over the first chunk.

Points whose arrays would not fit in the memory available (``/proc/meminfo``) are skipped and
listed, not attempted.

    python tools/bench_step35.py                               # the BENCHMARKS.md run
    python tools/bench_step35.py --contexts 1024 --batches 1 --prefill 2048 --smoke
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import step3_jax
from step3_jax.model import family
from step3_jax.model.config import presets_dir
from step3_jax.model.moe import per_expert_layout
from step3_jax.model.step35_layers import resolve_impl as step35_attention_impl
from step3_jax.model.step35_reader import from_any_dict
from step3_jax.model.weights import is_spec, unstack_moe
from step3_jax.runtime import bench
from step3_jax.runtime.bench import cpu_model, csv_ints, loadavg

MAX_POSITION = 65536


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ----- the models ---------------------------------------------------------------------------------

def raw_config(preset: str, layers: int | None) -> dict:
    """A preset's Hub dict with a 64K context, cut to its first ``layers`` layers if given."""
    raw = json.loads((presets_dir() / f"{preset}.json").read_text())
    raw.pop("_comment", None)
    raw["max_position_embeddings" if "step3p5" in raw["model_type"]
        else "max_position_embedding"] = MAX_POSITION
    if layers is not None and layers < raw["num_hidden_layers"]:
        full = raw["num_hidden_layers"] + raw.get("num_nextn_predict_layers", 0)
        for key, value in list(raw.items()):
            if isinstance(value, list) and len(value) in (raw["num_hidden_layers"], full):
                raw[key] = value[:layers]
        raw["moe_layers_enum"] = ",".join(
            x for x in str(raw["moe_layers_enum"]).split(",") if int(x) < layers)
        raw.update(num_hidden_layers=layers, num_nextn_predict_layers=0,
                   _name_or_path=f"{preset}-{layers}layer")
    return raw


def in_kernel_layout(params, cfg):
    """The routed experts as the MoE kernel reads them (per-expert arrays for ``loop``)."""
    if not per_expert_layout(cfg):
        return params
    layers = tuple(layer.replace(ffn=unstack_moe(layer.ffn)) if hasattr(layer.ffn, "router")
                   else layer for layer in params.layers)
    return params.replace(layers=layers)


def load(preset: str, layers: int | None, seed: int):
    raw = raw_config(preset, layers)
    cfg = from_any_dict(raw, name=raw.get("_name_or_path", preset))
    if family.is_step35(cfg):
        params = family.of(cfg).weights.init_params(cfg, seed)
    else:  # Step-3's loader draws its random weights and lays the experts out itself
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "config.json")
            with open(path, "w") as f:
                json.dump(raw, f)
            params, cfg = step3_jax.load(config=path, seed=seed, progress=False)
    return jax.block_until_ready(in_kernel_layout(params, cfg)), cfg


# ----- bytes one decode step must read ------------------------------------------------------------

def bytes_per_step(cfg, batch: int, context: float) -> dict:
    """Weights (embedding: a row per sequence), routed experts at the expected distinct count,
    and the KV each layer keeps at ``context`` positions (module docstring, 2.)."""
    if not family.is_step35(cfg):
        need = bench.bytes_per_step(cfg, batch, context)
        return {k: need[k] for k in ("weights", "experts", "kv", "total")}
    distinct = bench.expected_distinct_experts(cfg.moe_num_experts, cfg.moe_top_k, batch)
    weights = experts = 0.0
    for spec in jax.tree.leaves(family.of(cfg).weights.declare(cfg), is_leaf=is_spec):
        size = math.prod(spec.shape) * 4
        if spec.hub == "model.embed_tokens.weight":
            weights += batch * cfg.hidden_size * 4
        elif "expert_mlp" in spec.axes:
            experts += size / spec.shape[0] * distinct
        else:
            weights += size
    positions = sum(min(context, cfg.sliding_window) if cfg.is_sliding(i) else context
                    for i in range(cfg.num_hidden_layers))
    kv = batch * positions * 2 * cfg.num_attention_groups * cfg.head_dim * 4
    return {"weights": weights, "experts": experts, "kv": kv,
            "total": weights + experts + kv}


def cache_bytes(cfg, batch: int, capacity: int) -> int:
    if not family.is_step35(cfg):
        return cfg.num_hidden_layers * 2 * batch * capacity * cfg.head_dim * 4
    return sum(2 * batch * (min(capacity, cfg.sliding_window) if cfg.is_sliding(i) else capacity)
               * cfg.num_attention_groups * cfg.head_dim * 4
               for i in range(cfg.num_hidden_layers))


def mem_available() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024.0
    return float("inf")


def fits(need: float) -> str | None:
    """None when ``need`` bytes (beyond the weights) fit, else why not."""
    avail = mem_available()
    if 1.3 * need + 1e9 > avail:
        return f"needs ~{need / 1e9:.1f} GB beyond the weights, {avail / 1e9:.1f} GB available"
    return None


# ----- decode -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnums=2)
def decode_loop(params, token, cache, cfg, steps: int):
    """``steps`` greedy decode steps from ``token [B]`` over ``cache`` (either family)."""
    forward = family.of(cfg).decoder.forward

    def step(_, carry):
        token, cache = carry
        logits, cache = forward(params, token[:, None], cache, cfg)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, steps, step, (token, cache))


@functools.partial(jax.jit, donate_argnums=0)
def _fill(a, seed):
    """Values in [-1, 1] that vary along every axis (a sine of the flat index: cheap, unlike
    drawing gigabytes of normals); positions past the context are never read."""
    i = jax.lax.iota(jnp.float32, a.size).reshape(a.shape)
    return jnp.sin(i * 0.7548 + seed).astype(a.dtype)


def filled_cache(cfg, batch: int, capacity: int, context: int, seed: int):
    """A cache of ``capacity`` positions of which the first ``context`` count as written."""
    cache = family.of(cfg).decoder.init_cache(cfg, batch, capacity, jnp.float32)
    k = tuple(_fill(a, jnp.float32(seed + 2 * i)) for i, a in enumerate(cache.k))
    v = tuple(_fill(a, jnp.float32(seed + 2 * i + 1)) for i, a in enumerate(cache.v))
    return cache.replace(k=k, v=v, lengths=jnp.full((batch,), context, jnp.int32))


def full_attention_kernel(cfg, batch: int, keys: int) -> str:
    """The kernel ``auto`` picks for a decode query over ``keys`` slots on a full layer."""
    if family.is_step35(cfg):
        return step35_attention_impl(cfg.attention_impl, batch, 1, cfg.attention_heads[0], keys)
    from step3_jax.model.attention import resolve_impl
    return resolve_impl(cfg, batch, 1, cfg.num_attention_heads, keys)


def decode_point(params, cfg, *, batch, context, steps, repeats, flush, seed) -> dict:
    capacity = context + steps
    row = {"family": family.of(cfg).label, "config": cfg.name, "context": context,
           "batch": batch, "steps": steps, "capacity": capacity,
           "full_attention_kernel": full_attention_kernel(cfg, batch, capacity)}
    skip = fits(cache_bytes(cfg, batch, capacity))  # donated: one cache at a time
    if skip:
        return dict(row, skipped=skip)
    rng = np.random.default_rng(seed)
    first = jnp.asarray(rng.integers(2, cfg.vocab_size, size=batch), jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(decode_loop(params, first, filled_cache(cfg, batch, capacity, context,
                                                                  seed), cfg, steps))
    row["compile_s"] = time.perf_counter() - t0
    runs = []
    for r in range(repeats):
        cache = jax.block_until_ready(filled_cache(cfg, batch, capacity, context, seed + r))
        flush()
        t0 = time.perf_counter()
        jax.block_until_ready(decode_loop(params, first, cache, cfg, steps))
        runs.append((time.perf_counter() - t0) * 1e3 / steps)
        del cache
    row["runs_ms"] = runs
    row["step_ms"] = min(runs)
    row["bytes"] = bytes_per_step(cfg, batch, context + (steps + 1) / 2)
    return row


# ----- prefill ------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="cfg", donate_argnums=2)
def prefill_chunk(params, tokens, cache, cfg):
    _, cache = family.of(cfg).decoder.forward(params, tokens, cache, cfg)
    return cache


def prefill_point(params, cfg, *, length: int, chunk: int, capacity: int, seed: int) -> dict:
    row = {"family": family.of(cfg).label, "config": cfg.name, "tokens": length,
           "chunk": chunk, "layers": cfg.num_hidden_layers}
    skip = fits(cache_bytes(cfg, 1, capacity) + 64 * chunk * cfg.hidden_size * 4)
    if skip:
        return dict(row, skipped=skip)
    prompt = np.random.default_rng(seed).integers(2, cfg.vocab_size, size=(1, length))
    decoder = family.of(cfg).decoder
    t0 = time.perf_counter()
    jax.block_until_ready(prefill_chunk(params, jnp.asarray(prompt[:, :chunk], jnp.int32),
                                        decoder.init_cache(cfg, 1, capacity, jnp.float32), cfg))
    row["compile_s"] = time.perf_counter() - t0
    cache = decoder.init_cache(cfg, 1, capacity, jnp.float32)
    t0 = time.perf_counter()
    for c in range(0, length, chunk):
        cache = prefill_chunk(params, jnp.asarray(prompt[:, c: c + chunk], jnp.int32), cache, cfg)
    jax.block_until_ready(cache)
    row["seconds"] = time.perf_counter() - t0
    row["tokens_per_s"] = length / row["seconds"]
    return row


# ----- report -------------------------------------------------------------------------------------

def derive(row: dict, peak_gbs: float) -> dict:
    if "step_ms" not in row:
        return row
    need = row["bytes"]["total"]
    return dict(row, peak_gbs=peak_gbs, tokens_per_s=row["batch"] * 1e3 / row["step_ms"],
                roofline_ms=need / (peak_gbs * 1e9) * 1e3,
                roofline_fraction=need / (row["step_ms"] / 1e3) / (peak_gbs * 1e9))


def markdown(report: dict) -> str:
    s = report["setting"]
    text = (f"Setting: {s['cpu']}, {s['cores']} cores, JAX {s['jax']}, {s['date']}; float32; "
            f"`uptime` at the start: {s['uptime_start']}; at the end: {s['uptime_end']}.\n")
    if report["decode"]:
        text += ("\nDecode (best of the runs; bytes = what the step must read; roofline = bytes "
                 "/ the matvec bandwidth measured around the point):\n\n"
                 "| context | batch | model | full-layer kernel | KV MB/step | bytes/step | "
                 "ms/step | tokens/s | roofline ms | of roofline | compile s |\n"
                 "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in report["decode"]:
        head = f"| {r['context']} | {r['batch']} | {r['config']} | {r['full_attention_kernel']} "
        if r.get("skipped"):
            text += head + f"| skipped: {r['skipped']} |" + " — |" * 6 + "\n"
            continue
        b = r["bytes"]
        text += (head + f"| {b['kv'] / 1e6:.0f} | {b['total'] / 1e9:.3f} GB "
                 f"| {r['step_ms']:.1f} | {r['tokens_per_s']:.1f} | {r['roofline_ms']:.1f} "
                 f"| {100 * r['roofline_fraction']:.0f}% | {r['compile_s']:.0f} |\n")
    if report["prefill"]:
        text += ("\nPrefill (one sequence, chunked; models cut to their first "
                 f"{report['prefill'][0]['layers']} layers):\n\n"
                 "| tokens | model | chunk | seconds | tokens/s | compile s |\n"
                 "|---:|---|---:|---:|---:|---:|\n")
        for r in report["prefill"]:
            if r.get("skipped"):
                text += f"| {r['tokens']} | {r['config']} | {r['chunk']} | skipped: " \
                        f"{r['skipped']} | — | — |\n"
                continue
            text += (f"| {r['tokens']} | {r['config']} | {r['chunk']} | {r['seconds']:.1f} "
                     f"| {r['tokens_per_s']:.0f} | {r['compile_s']:.0f} |\n")
    return text


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return str(loadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="step35-bench,bench",
                    help="presets, in the order each point runs them (default %(default)s)")
    ap.add_argument("--contexts", type=lambda t: [] if t == "0" else csv_ints(t),
                    default=[4096, 32768], help="decode contexts ('0': no decode)")
    ap.add_argument("--batches", type=csv_ints, default=[1, 16])
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="timed decode runs per point")
    ap.add_argument("--prefill", type=lambda t: [] if t == "0" else csv_ints(t),
                    default=[8192, 32768], help="prompt lengths ('0': no prefill)")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--prefill-layers", type=int, default=4)
    ap.add_argument("--flush-mb", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="a quick check of the tool: both models cut to 2 layers")
    ap.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="write the tables to PATH")
    args = ap.parse_args(argv)
    too_long = [n for n in args.contexts + args.prefill if n + args.steps > MAX_POSITION]
    if too_long:
        ap.error(f"context {too_long[0]} is past the models' {MAX_POSITION} positions")
    if any(n % args.prefill_chunk for n in args.prefill):
        ap.error(f"--prefill lengths must be multiples of --prefill-chunk {args.prefill_chunk}")
    presets = [m.strip() for m in args.models.split(",") if m.strip()]
    setting = {"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "uptime_start": uptime(), "models": presets, "steps": args.steps,
               "repeats": args.repeats, "flush_mb": args.flush_mb}
    log(f"# {setting['uptime_start']}")
    flush = bench.Flusher(args.flush_mb)
    decode_layers = 2 if args.smoke else None
    models = {p: load(p, decode_layers, args.seed) for p in presets} if args.contexts else {}
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            before = bench.roofline(10, flush)["gb_per_s"]
            point = []
            for preset in presets:
                params, cfg = models[preset]
                row = decode_point(params, cfg, batch=batch, context=context, steps=args.steps,
                                   repeats=args.repeats, flush=flush, seed=args.seed)
                log(f"decode {cfg.name} context {context} batch {batch}: "
                    + (row.get("skipped") or f"{row['step_ms']:.1f} ms/step "
                       f"(runs {', '.join(f'{x:.1f}' for x in row['runs_ms'])})"))
                point.append(row)
            peak = (before + bench.roofline(10, flush)["gb_per_s"]) / 2
            rows += [derive(r, peak) for r in point]
    models.clear()
    prefill = []
    if args.prefill:
        capacity = max(args.prefill)
        for preset in presets:
            params, cfg = load(preset, 2 if args.smoke else args.prefill_layers, args.seed)
            for length in args.prefill:
                row = prefill_point(params, cfg, length=length, chunk=args.prefill_chunk,
                                    capacity=capacity, seed=args.seed)
                log(f"prefill {cfg.name} {length} tokens: "
                    + (row.get("skipped") or f"{row['seconds']:.1f} s, "
                       f"{row['tokens_per_s']:.0f} tokens/s"))
                prefill.append(row)
            del params
    setting["uptime_end"] = uptime()
    report = {"setting": setting, "decode": rows, "prefill": prefill}
    text = markdown(report)
    log("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
