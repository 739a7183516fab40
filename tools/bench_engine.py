#!/usr/bin/env python3
"""The continuous-batching engine on this CPU: offline throughput against the static batch, paged
against contiguous attention, inter-token latency while a long prompt enters, and the decode
burst length.

Model: the ``bench`` preset's shapes (``configs/bench.json``: hidden 1024, 16 query heads of 128
sharing one K/V head, 48 experts top-3 + a shared expert) cut to ``--layers`` layers (2: layer 0
dense, layer 1 MoE, as ``tools/bench_long_context.py``; the full 10 would take 5x as long on this
2-core CPU), ``max_position_embedding`` 16384 (room for the 8K prompt and its neighbours),
float32, seeded random weights loaded by ``step3_jax.load``. Every request decodes to its own
budget (no stop ids), every prompt is seeded random token ids.

1. **Throughput** (``--requests`` requests, prompt lengths log-uniform in ``--prompt-range``,
   budgets log-uniform in ``--output-range``, seeded): the engine (``make_engine`` with
   ``--max-num-seqs``, ``--page-size``, ``--prefill-chunk``, a pool that never preempts; every
   request added with its own ``max_tokens``, then ``engine.run()``) against the static batch
   (``Generator``) of the same requests in arrival order, ``--max-num-seqs`` at a time, each
   batch decoding to its longest budget (``generate`` takes one budget; the extra tokens are
   thrown away and not counted). Both count the same useful tokens (the sum of the budgets).
   The engine runs the mix twice: the first pass compiles its programs (the compile seconds of
   that pass from JAX's compile events, ``runtime.metrics.CompileClock``), the second is timed.
   ``Generator`` compiles ahead of time and times prefill and decode apart, so its run time
   excludes compiles without a second pass. KV bytes held: the engine's peak pages in use
   (sampled at every prefill chunk and decode burst, after the pages are reserved) x
   ``paged.page_bytes``; the static batch's ``batch x cache capacity x KV bytes per token``
   (its cache lives the whole batch). ``--engine-decode-roads auto,blocked`` adds an engine
   whose decode steps take that paged road (``paged.paged_impl`` replaced for one-query calls
   while its programs trace); every engine compiles before any is timed.
2. **Attention** (``--contexts`` x ``--batches``, one decode query per row, every row's cache
   full): ``paged.attend_pages`` with ``impl="gather"`` and ``"blocked"`` over a page pool (rows'
   pages scattered by a seeded permutation) against ``attention.attend_positions`` on the
   contiguous cache with ``attention_impl`` ``plain`` and ``blocked``; the best of a few runs
   after a warm-up, the four timed round-robin (``tools/bench_attention.py``'s ``best_times``).
   What ``paged.paged_impl`` (the engine's auto choice) and ``attention.resolve_impl`` pick is
   recorded.
3. **Inter-token latency** (``--itl-running`` sequences with ``--itl-short``-token prompts
   decoding when an ``--itl-long``-token prompt arrives, with each of ``--itl-chunks``; 0: the
   whole prompt in one step): the worst gap between token deliveries of the running sequences
   from the long prompt's arrival until its first token, against their median gap before it
   arrived. Each setting runs twice on one engine (all settings share one ``DeviceRunner``, so
   their programs compile once); the second is reported.
4. **Decode steps** (``--k`` tokens per on-device burst, on ``--k-presets``): ``--k-requests``
   requests of ``--k-prompt`` tokens decoding ``--k-tokens`` tokens each through one engine
   whose ``decode_steps`` is set before each run; decode tokens/s = decode tokens / seconds
   inside ``runner.decode`` (the prefill does not depend on k). Each k warmed up once, then
   ``--k-rounds`` rounds over all k, best kept.

Around it all: ``uptime`` and the float32 matmul peak (``tools/bench_attention.py``) at the start,
between parts and at the end, so the figures can be read against the machine's load.

    python tools/bench_engine.py                                    # markdown on stdout
    python tools/bench_engine.py --json --plot docs/engine.png > docs/engine.json
    python tools/bench_engine.py --render docs/engine.json --plot docs/engine.png
    python tools/bench_engine.py --parts decode_steps --json > k.json   # one part again, then
    python tools/bench_engine.py --render docs/engine.json,k.json     # merged (k.json's part wins)
    python tools/bench_engine.py --parts attention,decode_steps --k-presets tiny
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step3_jax  # noqa: E402
from bench_attention import best_times, matmul_peak_gflops  # noqa: E402
from step3_jax.model import paged  # noqa: E402
from step3_jax.model.attention import attend_positions, resolve_impl  # noqa: E402
from step3_jax.model.config import presets_dir  # noqa: E402
from step3_jax.model.weights import count_params  # noqa: E402
from step3_jax.runtime.bench import cpu_model, csv_ints  # noqa: E402
from step3_jax.runtime.engine import Engine  # noqa: E402

try:  # main after 2643e70: make_engine in engine_setup, the defaults in model.config
    from step3_jax.model.config import DEFAULT_DECODE_STEPS
    from step3_jax.runtime.engine_setup import make_engine
except ImportError:  # the engine as this tool was first run against (31cdc15)
    from step3_jax.runtime.engine import DEFAULT_DECODE_STEPS, make_engine
from step3_jax.runtime.generate import Generator  # noqa: E402
from step3_jax.runtime.metrics import CompileClock  # noqa: E402

PARTS = ("throughput", "attention", "itl", "decode_steps")
MB = 1e6


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def csv_chunks(text: str) -> list[int]:
    """Comma-separated prefill chunks, 0 allowed (the whole prompt)."""
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def csv_pair(text: str) -> tuple[int, int]:
    lo, hi = csv_ints(text)
    return lo, hi


# ----- models -------------------------------------------------------------------------------------

def write_config(directory: str, preset: str, layers: int | None, max_position: int | None) -> str:
    """A preset as a config.json, cut to ``layers`` layers (the MoE layers kept among them;
    bench: 0 dense, then MoE) with ``max_position_embedding`` raised to ``max_position``."""
    raw = json.loads((presets_dir() / f"{preset}.json").read_text())
    raw.pop("_comment", None)
    if layers and layers < raw["num_hidden_layers"]:
        moe = [i for i in (int(x) for x in raw["moe_layers_enum"].split(",")) if i < layers]
        raw.update(_name_or_path=f"{preset}-{layers}layer", num_hidden_layers=layers,
                   moe_layers_enum=",".join(map(str, moe)))
    if max_position:
        raw["max_position_embedding"] = max(raw["max_position_embedding"], max_position)
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump(raw, f)
    return path


def load_model(preset: str, layers: int | None, max_position: int | None, seed: int):
    with tempfile.TemporaryDirectory() as tmp:
        return step3_jax.load(config=write_config(tmp, preset, layers, max_position), seed=seed,
                              progress=False)


def model_doc(cfg) -> dict:
    counts = count_params(cfg)
    return {"name": cfg.name, "layers": cfg.num_hidden_layers, "moe_layers": len(cfg.moe_layers),
            "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "head_dim": cfg.head_dim, "experts": cfg.moe_num_experts, "top_k": cfg.moe_top_k,
            "max_position": cfg.max_position_embedding, "dtype": cfg.dtype,
            "params_total": counts["total"], "params_activated": counts["activated"],
            "kv_bytes_per_token": kv_bytes_per_token(cfg)}


def kv_bytes_per_token(cfg) -> int:
    return paged.page_bytes(cfg, 1, np.dtype(cfg.dtype).itemsize)


def random_prompt(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(2, vocab, size=n).tolist()


def log_uniform(rng, lo: int, hi: int, n: int) -> list[int]:
    return [int(round(x)) for x in np.exp(rng.uniform(math.log(lo), math.log(hi), n))]


class Watch:
    """Times ``runner.decode`` and samples the engine's pages in use at every device call (after
    the engine reserved them): wraps the runner's bound methods on this instance only."""

    def __init__(self, engine: Engine):
        self.engine, self.decode_s, self.peak_pages = engine, 0.0, 0
        runner = engine.runner
        self._decode, self._prefill = runner.decode, runner.prefill
        runner.decode, runner.prefill = self.decode, self.prefill

    def _sample(self) -> None:
        self.peak_pages = max(self.peak_pages, self.engine.metrics()["pages_used"])

    def decode(self, *args):
        self._sample()
        t0 = time.perf_counter()
        out = self._decode(*args)
        self.decode_s += time.perf_counter() - t0
        return out

    def prefill(self, *args):
        self._sample()
        return self._prefill(*args)

    def reset(self) -> None:
        self.decode_s, self.peak_pages = 0.0, 0


# ----- 1. throughput ------------------------------------------------------------------------------

def make_mix(args, vocab: int) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    lens = log_uniform(rng, *args.prompt_range, args.requests)
    budgets = log_uniform(rng, *args.output_range, args.requests)
    return [{"prompt": random_prompt(rng, n, vocab), "max_tokens": m}
            for n, m in zip(lens, budgets)]


def engine_pass(engine: Engine, watch: Watch, mix: list[dict]) -> dict:
    watch.reset()
    before = dict(engine.stats)
    t0 = time.perf_counter()
    with CompileClock() as clock:
        ids = [engine.add_request(r["prompt"], max_tokens=r["max_tokens"], stop_ids=[])
               for r in mix]
        engine.run()
    wall = time.perf_counter() - t0
    tokens = sum(len(engine.requests[i].generated) for i in ids)
    ttft = [engine.requests[i].timings()["ttft_s"] for i in ids]
    stats = {k: engine.stats[k] - before.get(k, 0) for k in engine.stats}
    return {"wall_s": wall, "compile_s": clock.seconds(), "tokens": tokens,
            "tokens_per_s": tokens / wall, "peak_pages": watch.peak_pages,
            "decode_s": watch.decode_s, "steps": stats.get("steps", 0),
            "decode_bursts": stats.get("decode_bursts", 0),
            "decode_steps": stats.get("decode_steps", 0),
            "preemptions": stats.get("preemptions", 0),
            "ttft_s_mean": float(np.mean(ttft)), "ttft_s_max": float(np.max(ttft))}


def bench_throughput(params, cfg, args) -> dict:
    mix = make_mix(args, cfg.vocab_size)
    seqs, page = args.max_num_seqs, args.page_size
    need = sorted(-(-(len(r["prompt"]) + r["max_tokens"] - 1) // page) for r in mix)
    num_pages = sum(need[-seqs:])  # the largest possible concurrent holding: never preempts
    itemsize = np.dtype(cfg.dtype).itemsize
    page_bytes = paged.page_bytes(cfg, page, itemsize)
    doc = {"requests": [{"prompt": len(r["prompt"]), "max_tokens": r["max_tokens"]} for r in mix],
           "max_num_seqs": seqs, "page_size": page, "num_pages": num_pages,
           "prefill_chunk": args.prefill_chunk, "decode_steps": DEFAULT_DECODE_STEPS,
           "page_bytes": page_bytes, "useful_tokens": sum(r["max_tokens"] for r in mix),
           "prompt_tokens": sum(len(r["prompt"]) for r in mix)}
    log(f"throughput: {len(mix)} requests, prompts {[len(r['prompt']) for r in mix]}, "
        f"budgets {[r['max_tokens'] for r in mix]}")

    # The static batch: arrival order, max_num_seqs at a time, each to its longest budget.
    gen = Generator(params, cfg, prefill_chunk=args.prefill_chunk)
    batches, compile_s, run_s, kv = [], 0.0, 0.0, 0
    for i in range(0, len(mix), seqs):
        group = mix[i: i + seqs]
        longest = max(r["max_tokens"] for r in group)
        _, m = gen([r["prompt"] for r in group], max_new_tokens=longest, eos_ids=[])
        b_run = (m["prefill_ms"] + m["decode_ms"]) / 1e3
        b_kv = len(group) * m["cache_capacity"] * kv_bytes_per_token(cfg)
        batches.append({"batch": len(group), "longest_budget": longest,
                        "prefill_bucket": m["prefill_bucket"],
                        "cache_capacity": m["cache_capacity"], "compile_s": m["compile_s"],
                        "prefill_s": m["prefill_ms"] / 1e3, "decode_s": m["decode_ms"] / 1e3,
                        "generated": m["generated_tokens"], "kv_bytes": b_kv})
        compile_s, run_s, kv = compile_s + m["compile_s"], run_s + b_run, max(kv, b_kv)
        log(f"  static batch {i // seqs}: {len(group)} rows to {longest} tokens, capacity "
            f"{m['cache_capacity']}: compile {m['compile_s']:.1f} s, prefill "
            f"{batches[-1]['prefill_s']:.1f} s, decode {batches[-1]['decode_s']:.1f} s")
    doc["static"] = {"batches": batches, "compile_s": compile_s, "wall_s": run_s,
                     "tokens_per_s": doc["useful_tokens"] / run_s, "kv_bytes_peak": kv,
                     "generated_incl_discarded": sum(b["generated"] for b in batches)}
    del gen

    # One engine per decode road; every engine's first (compiling) pass before any timed pass.
    engines = {}
    for road in args.engine_decode_roads:
        with decode_road(road):
            engine = make_engine(params, cfg, max_num_seqs=seqs, page_size=page,
                                 num_pages=num_pages, prefill_chunk=args.prefill_chunk)
            watch = Watch(engine)
            engines[road] = (engine, watch, [engine_pass(engine, watch, mix)])
    for road, (engine, watch, passes) in engines.items():
        with decode_road(road):
            passes.append(engine_pass(engine, watch, mix))
        for p, r in enumerate(passes):
            log(f"  engine (decode road {road}) pass {p + 1}: {r['wall_s']:.1f} s (compile "
                f"{r['compile_s']:.1f} s), {r['tokens_per_s']:.1f} tokens/s, peak "
                f"{r['peak_pages']} pages")
    doc["engine_by_decode_road"] = {}
    for road, (engine, watch, passes) in engines.items():
        run = passes[-1]
        doc["engine_by_decode_road"][road] = run | {
            "first_pass": passes[0], "kv_bytes_peak": run["peak_pages"] * page_bytes,
            "pool_bytes": num_pages * page_bytes,
            "ratio_tokens_per_s": run["tokens_per_s"] / doc["static"]["tokens_per_s"]}
    doc["engine"] = doc["engine_by_decode_road"][args.engine_decode_roads[0]]
    run = doc["engine"]
    doc["ratio_tokens_per_s"] = run["tokens_per_s"] / doc["static"]["tokens_per_s"]
    doc["ratio_kv_bytes"] = doc["engine"]["kv_bytes_peak"] / kv
    return doc


@contextlib.contextmanager
def decode_road(road: str):
    """``auto``: the engine's own choice; ``gather``/``blocked``: that paged road for every
    decode step (one query per row; prefill chunks keep ``paged.paged_impl``'s choice), by
    replacing ``paged.paged_impl`` while the engine's programs trace. Needs per-engine jitted
    programs (``DeviceRunner`` as of 31cdc15): programs shared across engines and keyed on the
    config alone would be reused untraced, and the override would not take."""
    if road == "auto":
        yield
        return
    original = paged.paged_impl

    def forced(cfg, batch, queries, heads, keys):
        return road if queries == 1 else original(cfg, batch, queries, heads, keys)

    paged.paged_impl = forced
    try:
        yield
    finally:
        paged.paged_impl = original


# ----- 2. attention -------------------------------------------------------------------------------

def bench_attention_cost(cfg, args) -> list[dict]:
    n, d, page = cfg.num_attention_heads, cfg.head_dim, args.page_size
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            keys = jax.random.split(jax.random.key(args.seed), 4)
            width = ctx // page
            q = jax.random.normal(keys[0], (batch, 1, n, d), jnp.float32)
            k_t = jax.random.normal(keys[1], (batch, d, ctx), jnp.float32)
            v = jax.random.normal(keys[2], (batch, ctx, d), jnp.float32)
            # The same keys in pages: row b's page j is pool page perm[b * width + j].
            perm = np.random.default_rng(args.seed).permutation(batch * width).astype(np.int32)
            table = jnp.asarray(perm.reshape(batch, width))
            k_pages = jnp.zeros((batch * width, d, page), jnp.float32).at[table].set(
                k_t.reshape(batch, d, width, page).transpose(0, 2, 1, 3))
            v_pages = jnp.zeros((batch * width, page, d), jnp.float32).at[table].set(
                v.reshape(batch, width, page, d))
            key_len = jnp.full((batch,), ctx, jnp.int32)
            q_pos = (key_len - 1)[:, None]
            jobs = {}
            for impl in ("plain", "blocked"):
                c = cfg.replace(attention_impl=impl)
                jobs[f"contiguous_{impl}"] = (jax.jit(
                    lambda q, k, v, p, L, c=c: attend_positions(q, k, v, p, L, c)),
                    (q, k_t, v, q_pos, key_len))
            for impl in ("gather", "blocked"):
                jobs[f"paged_{impl}"] = (jax.jit(
                    lambda q, k, v, t, p, L, impl=impl: paged.attend_pages(q, k, v, t, p, L, cfg,
                                                                           impl=impl)),
                    (q, k_pages, v_pages, table, q_pos, key_len))
            outs = {name: np.asarray(fn(*inputs)) for name, (fn, inputs) in jobs.items()}
            err = max(float(np.abs(o - outs["contiguous_plain"]).max()) for o in outs.values())
            ms = {k: 1e3 * t for k, t in best_times(jobs, args.attn_repeats, 3.0).items()}
            row = {"context": ctx, "batch": batch, "ms": ms, "max_abs_diff": err,
                   "paged_auto": paged.paged_impl(cfg, batch, 1, n, ctx),
                   "contiguous_auto": resolve_impl(cfg, batch, 1, n, ctx),
                   "kv_mb": batch * ctx * d * 2 * 4 / MB}
            auto_p = ms[f"paged_{row['paged_auto']}"]
            auto_c = ms[f"contiguous_{row['contiguous_auto']}"]
            row["auto_ratio"] = auto_p / auto_c
            row["best_ratio"] = min(ms["paged_gather"], ms["paged_blocked"]) / min(
                ms["contiguous_plain"], ms["contiguous_blocked"])
            rows.append(row)
            log(f"  attention C={ctx} B={batch}: " + ", ".join(f"{k} {t:.2f} ms"
                                                             for k, t in ms.items())
                + f"; auto picks paged {row['paged_auto']}, contiguous "
                  f"{row['contiguous_auto']} (paged/contiguous {row['auto_ratio']:.2f}x)")
            del jobs, k_pages, v_pages, k_t, v
    return rows


# ----- 3. inter-token latency ---------------------------------------------------------------------

def itl_scenario(engine: Engine, args, rng, vocab: int) -> dict:
    ids = [engine.add_request(random_prompt(rng, args.itl_short, vocab),
                              max_tokens=args.itl_budget, stop_ids=[])
           for _ in range(args.itl_running)]
    while min(len(engine.requests[i].generated) for i in ids) < args.itl_warm:
        engine.step()
    arrival = time.perf_counter()
    long_id = engine.add_request(random_prompt(rng, args.itl_long, vocab), max_tokens=1,
                                 stop_ids=[])
    while engine.requests[long_id].status != "finished":
        engine.step()
    first = engine.requests[long_id].token_times[0]
    for i in ids:
        engine.cancel(i)
    before, during = [], []
    for i in ids:
        times = sorted(set(engine.requests[i].token_times))
        for a, b in zip(times, times[1:]):
            if b <= arrival:
                before.append(b - a)
            elif a < first:
                during.append(b - a)
    assert engine.metrics()["pages_used"] == 0
    return {"ttft_long_s": first - arrival, "gap_max_s": max(during),
            "gap_median_before_s": float(np.median(before)), "gaps_during_s": during,
            "deliveries_during": len(during) // max(len(ids), 1)}


def bench_itl(params, cfg, args) -> list[dict]:
    page = args.page_size
    short_pages = -(-(args.itl_short + args.itl_budget) // page)
    num_pages = args.itl_running * short_pages + -(-args.itl_long // page)
    base = make_engine(params, cfg, max_num_seqs=args.itl_running + 1, page_size=page,
                       num_pages=num_pages, prefill_chunk=args.itl_chunks[0])
    rows = []
    for chunk in args.itl_chunks:
        engine = Engine(base.runner, cfg, max_num_seqs=args.itl_running + 1, page_size=page,
                        num_pages=num_pages, prefill_chunk=chunk,
                        max_model_len=base.max_model_len)
        runs = []
        for p in range(2):
            t0 = time.perf_counter()
            with CompileClock() as clock:
                r = itl_scenario(engine, args, np.random.default_rng(args.seed), cfg.vocab_size)
            r |= {"wall_s": time.perf_counter() - t0, "compile_s": clock.seconds()}
            runs.append(r)
            log(f"  itl chunk={chunk or 'whole'} pass {p + 1}: worst gap {r['gap_max_s']:.2f} s "
                f"(median before {r['gap_median_before_s']:.3f} s), long TTFT "
                f"{r['ttft_long_s']:.1f} s, compile {r['compile_s']:.1f} s")
        rows.append({"prefill_chunk": chunk, **runs[-1], "first_pass": runs[0]})
    return rows


# ----- 4. decode steps ----------------------------------------------------------------------------

def bench_decode_steps(preset: str, args) -> dict:
    layers = args.layers if preset == args.preset else None
    params, cfg = load_model(preset, layers, None, args.seed)
    rng = np.random.default_rng(args.seed)
    prompts = [random_prompt(rng, args.k_prompt, cfg.vocab_size) for _ in range(args.k_requests)]
    page = args.page_size
    per = -(-(args.k_prompt + args.k_tokens) // page)
    engine = make_engine(params, cfg, max_num_seqs=args.k_requests, page_size=page,
                         num_pages=args.k_requests * per, prefill_chunk=0)
    watch = Watch(engine)

    def one(k: int) -> dict:
        engine.decode_steps = k
        watch.reset()
        t0 = time.perf_counter()
        ids = [engine.add_request(p, max_tokens=args.k_tokens, stop_ids=[]) for p in prompts]
        engine.run()
        wall = time.perf_counter() - t0
        decode_tokens = sum(len(engine.requests[i].generated) - 1 for i in ids)
        return {"decode_s": watch.decode_s, "wall_s": wall,
                "decode_tokens_per_s": decode_tokens / watch.decode_s,
                "tokens_per_s": decode_tokens / wall}

    compile_s = {}
    for k in args.k:
        with CompileClock() as clock:
            one(k)
        compile_s[k] = clock.seconds()
    best: dict[int, dict] = {}
    for _ in range(args.k_rounds):
        for k in args.k:
            r = one(k)
            if k not in best or r["decode_s"] < best[k]["decode_s"]:
                best[k] = r
    rows = [{"k": k, "compile_s": compile_s[k], **best[k]} for k in args.k]
    for r in rows:
        log(f"  decode_steps {preset} k={r['k']}: {r['decode_tokens_per_s']:.1f} decode tokens/s "
            f"({r['tokens_per_s']:.1f} with prefill), compile {r['compile_s']:.1f} s")
    return {"preset": preset, "model": model_doc(cfg), "requests": args.k_requests,
            "prompt": args.k_prompt, "tokens": args.k_tokens, "page_size": page, "rows": rows}


# ----- report -------------------------------------------------------------------------------------

def fmt(x, spec=".1f", suffix="") -> str:
    return "—" if x is None else format(x, spec) + suffix


def markdown(doc: dict) -> str:
    m = doc["model"]
    out = [f"# Engine ({doc['date']})", "",
           f"- machine: {doc['cpu']}, {doc['cpus']} CPUs, jax {doc['jax']} ({doc['backend']})",
           f"- uptime at start: `{doc['uptime_start']}`", f"- uptime at end: `{doc['uptime_end']}`",
           f"- float32 matmul peak ({doc['peak_size']}^3, best of 10) at start, between parts, "
           f"at end: {', '.join(f'{p:.0f}' for p in doc['peak_gflops_runs'])} GFLOP/s",
           f"- model: {m['name']}: {m['layers']} layers ({m['moe_layers']} MoE), hidden "
           f"{m['hidden']}, {m['heads']} heads of {m['head_dim']}, {m['experts']} experts "
           f"top-{m['top_k']}, {m['dtype']}, {m['params_total'] / 1e6:.0f}M parameters, KV "
           f"{m['kv_bytes_per_token']} bytes/token", f"- wall time of the run: "
           f"{doc.get('total_s', 0) / 60:.1f} min; command: `{doc['command']}`", ""]
    if doc.get("sources"):  # merged documents: each source's own setting instead
        out = [line for line in out if not line.startswith(("- uptime", "- wall time"))]
        out[3] = "- sources (each part from the last that measured it; matmul peak in GFLOP/s):"
    for i, src in enumerate(doc.get("sources", [])):
        out.insert(4 + i, f"- {src['file']} ({', '.join(src['parts'] or PARTS)}): {src['date']}, "
                   f"`{src['command']}`, {src['total_s'] / 60:.1f} min, matmul peak "
                   f"{', '.join(f'{p:.0f}' for p in src['peak_gflops_runs'])} GFLOP/s, uptime "
                   f"`{src['uptime_start']}` -> `{src['uptime_end']}`")
    t = doc.get("throughput")
    if t:
        s, e = t["static"], t["engine"]
        s_steps = sum(b["longest_budget"] - 1 for b in s["batches"])  # first token: prefill
        s_step_ms = 1e3 * sum(b["decode_s"] for b in s["batches"]) / s_steps
        s_prefill = sum(b["prefill_s"] for b in s["batches"])
        reqs = ", ".join(f"{r['prompt']}/{r['max_tokens']}" for r in t["requests"])
        out += ["## Offline throughput", "",
                f"{len(t['requests'])} requests (prompt/budget): {reqs}; {t['prompt_tokens']} "
                f"prompt tokens, {t['useful_tokens']} output tokens. max_num_seqs "
                f"{t['max_num_seqs']}, page {t['page_size']}, pool {t['num_pages']} pages, "
                f"prefill chunk {t['prefill_chunk']}, decode_steps {t['decode_steps']}.", "",
                "| runtime | wall s (no compile) | output tokens/s | compile s | KV bytes held "
                "(peak) | notes |", "|---|---:|---:|---:|---:|---|",
                f"| static batches of {t['max_num_seqs']} | {s['wall_s']:.1f} "
                f"| {s['tokens_per_s']:.1f} | {s['compile_s']:.1f} "
                f"| {s['kv_bytes_peak'] / MB:.0f} MB | {len(s['batches'])} batches, each to its "
                f"longest budget ({s['generated_incl_discarded']} tokens decoded); prefill "
                f"{s_prefill:.1f} s, {s_steps} decode steps at {s_step_ms:.0f} ms |",
                f"| engine | {e['wall_s']:.1f} | {e['tokens_per_s']:.1f} "
                f"| {e['first_pass']['compile_s']:.1f} (first pass {e['first_pass']['wall_s']:.1f}"
                f" s) | {e['kv_bytes_peak'] / MB:.0f} MB ({e['peak_pages']} pages) "
                f"| {e['steps']} steps, {e['decode_bursts']} bursts, {e['decode_steps']} decode "
                f"steps at {1e3 * e['decode_s'] / e['decode_steps']:.0f} ms (decode "
                f"{e['decode_s']:.1f} s) |",
                *[f"| engine, decode road {road} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} "
                  f"| {r['first_pass']['compile_s']:.1f} | {r['kv_bytes_peak'] / MB:.0f} MB "
                  f"| {r['decode_steps']} decode steps at "
                  f"{1e3 * r['decode_s'] / r['decode_steps']:.0f} ms; "
                  f"{r['ratio_tokens_per_s']:.2f}x static |"
                  for road, r in list(t.get("engine_by_decode_road", {}).items())[1:]],
                f"| engine / static | {e['wall_s'] / s['wall_s']:.2f}x "
                f"| **{t['ratio_tokens_per_s']:.2f}x** | | **{t['ratio_kv_bytes']:.2f}x** | |",
                "", "| static batch | rows | to budget | prompt bucket | capacity | prefill s "
                "| decode s | compile s | KV MB |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for i, b in enumerate(s["batches"]):
            out.append(f"| {i} | {b['batch']} | {b['longest_budget']} | {b['prefill_bucket']} "
                       f"| {b['cache_capacity']} | {b['prefill_s']:.1f} | {b['decode_s']:.1f} "
                       f"| {b['compile_s']:.1f} | {b['kv_bytes'] / MB:.0f} |")
        out.append("")
    if doc.get("attention"):
        out += ["## Decode attention: paged against contiguous (ms, best of runs)", "",
                "| context | batch | contiguous plain | contiguous blocked | paged gather "
                "| paged blocked | auto: contiguous / paged | paged auto / contiguous auto "
                "| best paged / best contiguous |",
                "|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in doc["attention"]:
            ms = r["ms"]
            out.append(f"| {r['context']} | {r['batch']} | {ms['contiguous_plain']:.2f} "
                       f"| {ms['contiguous_blocked']:.2f} | {ms['paged_gather']:.2f} "
                       f"| {ms['paged_blocked']:.2f} | {r['contiguous_auto']} / "
                       f"{r['paged_auto']} | {r['auto_ratio']:.2f}x | {r['best_ratio']:.2f}x |")
        out.append("")
    if doc.get("itl"):
        i0 = doc["itl_setting"]
        out += ["## Inter-token latency while a long prompt enters", "",
                f"{i0['running']} sequences ({i0['short']}-token prompts) decoding when a "
                f"{i0['long']}-token prompt arrives; gaps between token deliveries of the running "
                f"sequences (a burst delivers up to {DEFAULT_DECODE_STEPS} tokens).", "",
                "| prefill chunk | worst gap s | median gap before s | long prompt TTFT s "
                "| deliveries while it entered | compile s (first pass) |",
                "|---:|---:|---:|---:|---:|---:|"]
        for r in doc["itl"]:
            out.append(f"| {r['prefill_chunk'] or 'whole (0)'} | **{r['gap_max_s']:.2f}** "
                       f"| {r['gap_median_before_s']:.3f} | {r['ttft_long_s']:.1f} "
                       f"| {r['deliveries_during']} | {r['first_pass']['compile_s']:.1f} |")
        out.append("")
    for d in doc.get("decode_steps", []):
        base = next((r for r in d["rows"] if r["k"] == 1), d["rows"][0])
        out += [f"## Decode steps per burst: {d['model']['name']} ({d['model']['layers']} "
                f"layers), {d['requests']} requests x {d['prompt']}-token prompts x "
                f"{d['tokens']} tokens", "",
                "| k | decode tokens/s | vs k=1 | tokens/s with prefill | compile s |",
                "|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            out.append(f"| {r['k']} | {r['decode_tokens_per_s']:.1f} "
                       f"| {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x "
                       f"| {r['tokens_per_s']:.1f} | {r['compile_s']:.1f} |")
        out.append("")
    return "\n".join(out) + "\n"


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    t = doc.get("throughput")
    ax = axes[0]
    if t:
        names = [f"static\n(batches of {t['max_num_seqs']})", "engine"]
        tps = [t["static"]["tokens_per_s"], t["engine"]["tokens_per_s"]]
        kv = [t["static"]["kv_bytes_peak"] / MB, t["engine"]["kv_bytes_peak"] / MB]
        x = np.arange(2)
        ax.bar(x - 0.2, tps, 0.4, label="output tokens/s", color="tab:blue")
        ax2 = ax.twinx()
        ax2.bar(x + 0.2, kv, 0.4, label="KV MB held (peak)", color="tab:orange")
        ax.set_xticks(x, names)
        ax.set_ylabel("output tokens/s")
        ax2.set_ylabel("KV MB held (peak)")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        ax.set_title(f"offline throughput, {len(t['requests'])} requests")
    ax = axes[1]
    colors = {"contiguous_plain": "tab:blue", "contiguous_blocked": "tab:green",
              "paged_gather": "tab:red", "paged_blocked": "tab:purple"}
    for batch, style in zip(sorted({r["batch"] for r in doc.get("attention", [])}),
                            ("o-", "s--", "^:")):
        rows = [r for r in doc["attention"] if r["batch"] == batch]
        for name, color in colors.items():
            ax.plot([r["context"] for r in rows], [r["ms"][name] for r in rows], style,
                    color=color, label=f"B={batch} {name.replace('_', ' ')}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (keys)")
    ax.set_ylabel("ms per decode attention call")
    ax.set_title("decode attention: paged vs contiguous")
    ax.legend(fontsize=6)
    ax = axes[2]
    for r in doc.get("itl", []):
        label = f"chunk {r['prefill_chunk']}" if r["prefill_chunk"] else "whole prompt"
        ax.plot(range(1, len(r["gaps_during_s"]) + 1), sorted(r["gaps_during_s"], reverse=True),
                "o-", label=f"{label}: worst {r['gap_max_s']:.1f} s")
    if doc.get("itl"):
        ax.axhline(doc["itl"][0]["gap_median_before_s"], color="k", ls=":",
                   label="median gap before it arrived")
        ax.set_yscale("log")
        ax.set_xlabel("gap rank (running sequences' deliveries)")
        ax.set_ylabel("seconds between deliveries")
        ax.set_title(f"while a {doc['itl_setting']['long']}-token prompt enters")
        ax.legend(fontsize=8)
    ax = axes[3]
    for d in doc.get("decode_steps", []):
        base = next((r for r in d["rows"] if r["k"] == 1), d["rows"][0])
        ax.plot([r["k"] for r in d["rows"]],
                [r["decode_tokens_per_s"] / base["decode_tokens_per_s"] for r in d["rows"]],
                "o-", label=f"{d['model']['name']} (k=1: {base['decode_tokens_per_s']:.0f} tok/s)")
    if doc.get("decode_steps"):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode steps per burst (k)")
        ax.set_ylabel("decode tokens/s vs k=1")
        ax.axvline(DEFAULT_DECODE_STEPS, color="k", ls=":", label="default")
        ax.set_title("tokens per on-device burst")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"engine on {doc['cpus']} cores, {doc['model']['name']}, float32; "
                 f"{doc['uptime_start'].split('load average:')[-1].strip()} (load at start); "
                 f"matmul peak {min(doc['peak_gflops_runs']):.0f}-"
                 f"{max(doc['peak_gflops_runs']):.0f} GFLOP/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----- main ---------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {PARTS}")
    ap.add_argument("--preset", default="bench", help="the model of parts 1-3 (tiny: a smoke test)")
    ap.add_argument("--layers", type=int, default=2, help="--preset cut to this many layers")
    ap.add_argument("--requests", type=int, default=12, help="throughput: requests in the mix")
    ap.add_argument("--prompt-range", type=csv_pair, default=(128, 4096),
                    help="throughput: prompt lengths, log-uniform")
    ap.add_argument("--output-range", type=csv_pair, default=(16, 512),
                    help="throughput: output budgets, log-uniform")
    ap.add_argument("--max-num-seqs", type=int, default=4, help="throughput: engine slots and "
                    "static batch size")
    ap.add_argument("--page-size", type=int, default=128)
    ap.add_argument("--prefill-chunk", type=int, default=2048,
                    help="throughput: engine per-step prefill budget and Generator's chunk")
    ap.add_argument("--engine-decode-roads", default="auto",
                    help="throughput: one engine per paged decode road (auto, gather, blocked; "
                         "the first is the headline)")
    ap.add_argument("--contexts", type=csv_ints, default=csv_ints("1024,4096,16384"),
                    help="attention: contexts")
    ap.add_argument("--batches", type=csv_ints, default=csv_ints("1,8"), help="attention")
    ap.add_argument("--attn-repeats", type=int, default=5, help="attention: timed rounds")
    ap.add_argument("--itl-running", type=int, default=4)
    ap.add_argument("--itl-short", type=int, default=64, help="running sequences' prompts")
    ap.add_argument("--itl-budget", type=int, default=512, help="running sequences' budget")
    ap.add_argument("--itl-warm", type=int, default=17,
                    help="tokens each running sequence has before the long prompt arrives")
    ap.add_argument("--itl-long", type=int, default=8192, help="the arriving prompt")
    ap.add_argument("--itl-chunks", type=csv_chunks, default=[512, 0],
                    help="prefill chunks compared (0: whole prompt)")
    ap.add_argument("--k", type=csv_ints, default=csv_ints("1,2,4,8,16"),
                    help="decode steps per burst")
    ap.add_argument("--k-presets", default="tiny,bench")
    ap.add_argument("--k-requests", type=int, default=8)
    ap.add_argument("--k-prompt", type=int, default=32)
    ap.add_argument("--k-tokens", type=int, default=64)
    ap.add_argument("--k-rounds", type=int, default=2)
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout "
                    "(markdown on stderr)")
    ap.add_argument("--plot", default=None, metavar="FILE.png")
    ap.add_argument("--render", default=None, metavar="JSON[,JSON]",
                    help="measure nothing: the markdown (and --plot) of saved --json documents "
                         "(several: each part from the last one that measured it)")
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    args.engine_decode_roads = [r for r in args.engine_decode_roads.split(",") if r]
    if any(r not in ("auto", "gather", "blocked") for r in args.engine_decode_roads):
        ap.error("--engine-decode-roads: auto, gather or blocked")
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part {bad[0]!r} (choose from {', '.join(PARTS)})")
    return args


def measure(args) -> dict:
    started = time.perf_counter()
    max_position = max(args.itl_long + args.itl_budget,
                       args.prompt_range[1] + args.output_range[1], max(args.contexts))
    params, cfg = load_model(args.preset, args.layers, max_position, args.seed)
    doc = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "cpu": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__,
           "backend": jax.default_backend(), "uptime_start": uptime(),
           "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
           "model": model_doc(cfg), "peak_size": args.peak_size, "parts": args.parts,
           "peak_gflops_runs": [matmul_peak_gflops(args.peak_size)]}
    log(f"start: {doc['uptime_start']}; matmul peak {doc['peak_gflops_runs'][0]:.0f} GFLOP/s")

    def between(name):
        doc["peak_gflops_runs"].append(matmul_peak_gflops(args.peak_size))
        doc.setdefault("uptime_between", {})[name] = uptime()
        log(f"after {name}: {doc['uptime_between'][name]}; matmul peak "
            f"{doc['peak_gflops_runs'][-1]:.0f} GFLOP/s; {time.perf_counter() - started:.0f} s")

    if "attention" in args.parts:
        doc["attention"] = bench_attention_cost(cfg, args)
        between("attention")
    if "throughput" in args.parts:
        doc["throughput"] = bench_throughput(params, cfg, args)
        between("throughput")
    if "itl" in args.parts:
        doc["itl_setting"] = {"running": args.itl_running, "short": args.itl_short,
                              "long": args.itl_long, "budget": args.itl_budget}
        doc["itl"] = bench_itl(params, cfg, args)
        between("itl")
    del params
    if "decode_steps" in args.parts:
        doc["decode_steps"] = [bench_decode_steps(p, args) for p in args.k_presets.split(",")]
        between("decode_steps")
    doc["uptime_end"] = uptime()
    doc["total_s"] = time.perf_counter() - started
    return doc


PART_KEYS = {"throughput": ("throughput",), "attention": ("attention",),
             "itl": ("itl", "itl_setting"), "decode_steps": ("decode_steps",)}


def render_docs(paths: list[str]) -> dict:
    """Saved ``--json`` documents as one: each part from the last document that measured it
    (a part re-run on its own replaces the first run's); every source's setting is kept."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    if len(docs) == 1:
        return docs[0]
    doc = dict(docs[0])
    doc["sources"] = []
    for path, d in zip(paths, docs):
        for part in d.get("parts", PARTS):
            for key in PART_KEYS[part]:
                if key in d:
                    doc[key] = d[key]
        doc["sources"].append({"file": os.path.basename(path), "parts": d.get("parts"),
                               **{k: d.get(k) for k in ("date", "command", "uptime_start",
                                                        "uptime_end", "peak_gflops_runs",
                                                        "total_s")}})
    doc["peak_gflops_runs"] = [p for d in docs for p in d["peak_gflops_runs"]]
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = render_docs(args.render.split(",")) if args.render else measure(args)
    if args.plot:
        plot(doc, args.plot)
        log(f"plot written to {args.plot}")
    if args.json and not args.render:
        print(json.dumps(doc, indent=1))
        log(markdown(doc))
    else:
        print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
