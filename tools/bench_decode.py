#!/usr/bin/env python
"""Decode sweep: our decode loop, the eager-PyTorch peer and the memory roofline, per batch and context.

For each (context, batch), measured in the same run and interleaved, because other jobs share
this machine and its bandwidth drifts (only ratios within one point are meaningful):

1. the roofline: ``step3_jax.runtime.bench.roofline`` (a float32 ``[1, 8192] @ [8192, 8192]`` matvec),
   before and after the point; the point uses their mean and reports the drift;
2. ours: the ``step3_jax.runtime.generate`` decode loop (the jitted ``while_loop`` with the donated cache
   that ``step3-jax generate`` runs), greedy, ``--new-tokens`` steps; step = run time / steps;
3. the peer (``tools/bench_peer.py``): the same steps in eager PyTorch, each step timed; step =
   median over the steps. Runs of ours and of the peer alternate (``--repeats`` each).

**Context** = the length of the prompt prefilled before decoding. Per context, each
implementation prefills one random prompt of that length (batch 1) and copies its KV cache to
every row of the batch; row ``b`` then decodes from its own random token: ``B`` requests sharing a
prefix, each with its own continuation, so the rows route to different experts (the peer counts
them). Distinct prompts would need ``B x context`` prefill tokens — 262k tokens and a 68 GB score
tensor at batch 64, context 4096, hours on two cores — and decode the same way.

Bytes per step (what the batch *must* read): ``step3_jax.runtime.bench.bytes_per_step`` with the KV cache
at its mean length over the decode (``context + (new_tokens + 1) / 2`` positions, not the
capacity our attention reads: ``generate.shape_buckets``, up to 12.5% more) and the routed experts at the distinct count the peer measured (the
uniform-routing expectation when the peer is off). Roofline tokens/s = batch x peak bandwidth /
bytes per step; MBU = bytes per step / step time / peak bandwidth.

Before timing, the peer is verified against our model on the same weights (first prompt tokens,
a few greedy steps; ``bench_peer.verify``); a mismatch stops the sweep. Each point also reports
how many rows' greedy tokens agree between ours and the peer (near-ties may flip late tokens).

Full sweep (bench preset, 4 batches x 3 contexts, 32 new tokens): bounded by ``--peer-budget``
(seconds of peer steps per point) and by the memory check (a point whose caches would not fit is
skipped and listed). Measured on this 2-core machine under a load average of 5-12 from other
jobs: 26 minutes for context 128, 50 for contexts 1024 and 4096 with ``--peer-budget 60`` (about
an hour and a quarter; the peer's prefill of 4096 tokens alone took 98 s, ours 58 s).

    python tools/bench_decode.py --batches 1,16 --contexts 128            # quick
    python tools/bench_decode.py --markdown sweep.md --png docs/decode_sweep.png --json > s.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step3_jax  # noqa: E402
from step3_jax.model import decoder  # noqa: E402
from step3_jax.model.cache import KVCache  # noqa: E402
from step3_jax.runtime import bench  # noqa: E402
from step3_jax.runtime.bench import cpu_model, csv_ints, loadavg  # noqa: E402
from step3_jax.runtime.generate import Generator, _decode, _LoopState, shape_buckets  # noqa: E402

TARGETS = {"mbu_batch1": 0.70, "roofline_batch16": 0.60, "peer_speedup": 1.5}
TARGET_CONTEXT, TARGET_NEW_TOKENS = 128, 32


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ----- ours: the generate decode loop from a shared-prefix cache ------------------------------------

class Ours:
    """Prefill one prompt into a cache and run ``generate``'s compiled decode loop from copies of it.

    The decode executable is the one ``Generator`` compiles and runs (``generate._decode``, state
    donated); only its starting state is built here instead of by a batch prefill.
    """

    def __init__(self, params, cfg):
        self.params, self.cfg = params, cfg
        self.gen = Generator(params, cfg)
        self._prefill = jax.jit(decoder.prefill, static_argnames=("capacity", "cfg"))

    def prefix(self, prompt: np.ndarray, capacity: int):
        """The batch-1 cache of ``prompt`` and the prefill's time (after a compiling call)."""
        tokens = jnp.asarray(prompt[None], jnp.int32)
        lengths = jnp.asarray([prompt.size], jnp.int32)
        run = lambda: self._prefill(self.params, tokens, lengths, capacity=capacity,  # noqa: E731
                                    cfg=self.cfg)
        jax.block_until_ready(run())
        t0 = time.perf_counter()
        _, cache = jax.block_until_ready(run())
        return cache, time.perf_counter() - t0

    def state(self, prefix: KVCache, first: np.ndarray):
        batch, capacity = first.size, prefix.capacity
        # Fresh buffers (the decode loop donates its state; the prefix must survive it).
        tile = lambda a: jnp.array(jnp.repeat(a, batch, axis=0), copy=True)  # noqa: E731
        cache = KVCache(k=tuple(map(tile, prefix.k)), v=tuple(map(tile, prefix.v)),
                        lengths=tile(prefix.lengths))
        zeros = lambda: jnp.zeros((batch,), jnp.int32)  # noqa: E731
        return _LoopState(step=jnp.int32(0), token=jnp.asarray(first, jnp.int32),
                          done=jnp.zeros((batch,), bool), reason=zeros(), n_gen=zeros(),
                          out=jnp.zeros((batch, capacity), jnp.int32), cache=cache)

    def knobs(self, batch: int, steps: int):
        keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.PRNGKey(0), b))(jnp.arange(batch))
        return (keys, jnp.full((batch,), steps, jnp.int32), jnp.asarray([-1], jnp.int32),
                jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))

    def decode(self, prefix: KVCache, first: np.ndarray, steps: int):
        """``steps`` greedy decode steps from the tiled prefix: (seconds, tokens [B, steps], compile s)."""
        state, knobs = self.state(prefix, first), self.knobs(first.size, steps)
        fn, compile_s = self.gen._executable(
            "decode", (first.size, prefix.capacity, 1), _decode,
            (self.params, state, *knobs), capacity=prefix.capacity, cfg=self.cfg)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(self.params, state, *knobs))
        seconds = time.perf_counter() - t0
        if int(out.step) != steps:
            raise RuntimeError(f"decode loop ran {int(out.step)} steps, expected {steps}")
        return seconds, np.asarray(out.out[:, :steps]), compile_s


# ----- one point -------------------------------------------------------------------------------------

def must_read_bytes(cfg, batch: int, context: int, new_tokens: int, distinct: float | None):
    """Bytes one decode step must read: mean KV length, measured distinct experts if known."""
    kv_len = context + (new_tokens + 1) / 2
    need = bench.bytes_per_step(cfg, batch, kv_len)
    expected = need["expected_distinct_experts_per_layer"]
    if distinct is not None and expected:
        need["experts"] *= distinct / expected
        need["total"] = need["weights"] + need["experts"] + need["kv"]
    need["distinct_experts_per_layer"] = distinct if distinct is not None else expected
    need["kv_positions"] = kv_len
    return need


def measure_point(ours: Ours, peer, prefixes: dict, cfg, *, batch: int, context: int,
                  new_tokens: int, repeats: int, flush, rng, peer_budget: float = 0.0) -> dict:
    first = rng.integers(2, cfg.vocab_size, size=batch)
    roof_before = bench.roofline(10, flush)
    # Warm-up: ours compiles its decode loop for this shape (2 steps); the peer runs 2 steps.
    _, _, compile_s = ours.decode(prefixes["ours"], first, 2)
    peer_steps = new_tokens
    if peer is not None:
        bp = sys.modules["bench_peer"]
        warm = []
        with bp.torch.inference_mode():
            bp.greedy(peer, bp.tile_cache(prefixes["peer"], batch), first, 2, warm)
        if peer_budget > 0:  # fewer peer steps per run where its steps are slow (not below 4)
            fit = int(peer_budget / repeats / warm[-1])
            peer_steps = max(4, min(new_tokens, fit))
    ours_ms, peer_ms, routing, ours_tokens, peer_tokens = [], [], None, None, None
    for r in range(repeats):
        flush()
        seconds, ours_tokens, _ = ours.decode(prefixes["ours"], first, new_tokens)
        ours_ms.append(seconds * 1e3 / new_tokens)
        if peer is not None:
            bp = sys.modules["bench_peer"]
            flush()
            times = []
            with bp.torch.inference_mode():
                cache = bp.tile_cache(prefixes["peer"], batch)
                peer.routing_log = [] if r == 0 else None
                tokens, cache = bp.greedy(peer, cache, first, peer_steps, times)
                if r == 0:
                    routing, peer_tokens = peer.routing_log, tokens[:, 1:]
                peer.routing_log = None
                del cache
            peer_ms += [t * 1e3 for t in times]
        log(f"  run {r + 1}/{repeats}: ours {ours_ms[-1]:.1f} ms/step"
            + (f", peer {statistics.median(times) * 1e3:.1f} ms/step" if peer is not None else ""))
    roof_after = bench.roofline(10, flush)
    distinct = statistics.mean(routing) if routing else None
    need = must_read_bytes(cfg, batch, context, new_tokens, distinct)
    row = {"context": context, "batch": batch, "new_tokens": new_tokens,
           "cache_capacity": prefixes["ours"].capacity, "compile_s": compile_s,
           "roofline_gbs_before": roof_before["gb_per_s"],
           "roofline_gbs_after": roof_after["gb_per_s"],
           "bytes_per_step": need["total"], "bytes": need, "ours_runs_ms": ours_ms,
           "loadavg": loadavg()}
    if peer is not None:
        row.update(peer_steps_ms=peer_ms, peer_steps_per_run=peer_steps,
                   rows_tokens_agree=int(np.sum(np.all(
                       ours_tokens[:, :peer_steps] == peer_tokens, axis=1))))
    return derive(row, "median")


def derive(row: dict, estimator: str) -> dict:
    """Step times, tokens/s, MBU and ratios of a point from its raw per-run timings.

    ``median``: ours = median over runs of (run time / steps), the peer = median over all its
    timed steps, peak = mean of the rooflines before and after. ``best`` (for a machine other jobs
    load unevenly): ours = its fastest run, the peer = the run with the lowest median step, peak =
    the higher roofline; each side's least-disturbed measurement, picked the same way.
    """
    if row.get("skipped"):
        return row
    row = dict(row, estimator=estimator)
    before, after = row["roofline_gbs_before"], row["roofline_gbs_after"]
    best = estimator == "best"
    row["peak_gbs"] = max(before, after) if best else (before + after) / 2
    peak, need, batch = row["peak_gbs"] * 1e9, row["bytes_per_step"], row["batch"]
    ours_step = (min if best else statistics.median)(row["ours_runs_ms"])
    row.update(roofline_tokens_per_s=batch * peak / need, ours_step_ms=ours_step,
               ours_tokens_per_s=batch * 1e3 / ours_step,
               ours_mbu=need / (ours_step / 1e3) / peak)
    if row.get("peer_steps_ms"):
        steps, n = row["peer_steps_ms"], row["peer_steps_per_run"]
        if best:
            runs = [steps[i: i + n] for i in range(0, len(steps), n)]
            peer_step = min(statistics.median(r) for r in runs)
        else:
            peer_step = statistics.median(steps)
        row.update(peer_step_ms=peer_step, peer_tokens_per_s=batch * 1e3 / peer_step,
                   peer_mbu=need / (peer_step / 1e3) / peak, ours_over_peer=peer_step / ours_step)
    return row


def point_memory(cfg, batch: int, context: int, new_tokens: int, capacity: int,
                 peer: bool) -> float:
    """Bytes a point holds at its peak beyond the weights: our donated cache (its capacity), or
    the peer's concatenated cache twice (the old and the grown one) plus one layer's K and V
    repeated to every head."""
    item, layers, d = 4, cfg.num_hidden_layers, cfg.head_dim
    ours = layers * 2 * batch * capacity * d * item
    if not peer:
        return ours
    length = context + new_tokens
    cache = layers * 2 * batch * length * d * item
    repeated = 2 * batch * cfg.num_attention_heads * length * d * item
    return max(ours, 2 * cache + repeated)


def mem_available() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except (OSError, ValueError):
        pass
    return None


# ----- report ----------------------------------------------------------------------------------------

def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def markdown_table(rows: list[dict]) -> str:
    """The sweep as one Markdown table, rows ordered by context then batch."""
    head = ("| context | batch | experts/layer | bytes/step | roofline GB/s | roofline tok/s "
            "| ours tok/s | peer tok/s | ours MBU | peer MBU | ours/peer |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"])):
        if r.get("skipped"):
            lines.append(f"| {r['context']} | {r['batch']} |" + " skipped |" + " — |" * 8)
            continue
        peer_tps, peer_mbu, ratio = (r.get(k) for k in ("peer_tokens_per_s", "peer_mbu",
                                                        "ours_over_peer"))
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['bytes']['distinct_experts_per_layer']:.1f} "
            f"| {r['bytes_per_step'] / 1e9:.3f} GB | {r['peak_gbs']:.1f} "
            f"| {r['roofline_tokens_per_s']:.1f} | {r['ours_tokens_per_s']:.1f} "
            f"| {_fmt(peer_tps, '.1f')} | {100 * r['ours_mbu']:.0f}% "
            f"| {'—' if peer_mbu is None else f'{100 * peer_mbu:.0f}%'} "
            f"| {'—' if ratio is None else f'{ratio:.2f}×'} |")
    return head + "\n".join(lines) + "\n"


def targets(rows: list[dict], new_tokens: int) -> list[dict]:
    """The performance issue's targets (context 128, 32 new tokens), met or missed and by how much."""
    out = []
    if new_tokens != TARGET_NEW_TOKENS:
        return out
    at = {r["batch"]: r for r in rows if r["context"] == TARGET_CONTEXT}
    checks = [("batch 1: MBU", 1, "ours_mbu", TARGETS["mbu_batch1"]),
              ("batch 16: fraction of the roofline", 16, "ours_mbu", TARGETS["roofline_batch16"]),
              ("batch 1: ours / peer tokens/s", 1, "ours_over_peer", TARGETS["peer_speedup"]),
              ("batch 16: ours / peer tokens/s", 16, "ours_over_peer", TARGETS["peer_speedup"])]
    for name, batch, key, target in checks:
        if batch in at and at[batch].get(key) is not None:
            value = at[batch][key]
            out.append({"target": name, "batch": batch, "value": value, "required": target,
                        "met": value >= target, "shortfall": max(0.0, target - value)})
    return out


def markdown(report: dict) -> str:
    s = report["setting"]
    text = (f"Setting: {s['cpu']}, {s['cores']} cores, JAX {s['jax']}, torch {s['torch'] or '—'} "
            f"({s['threads']} threads), {s['date']}; config `{s['config']}`, float32, "
            f"{s['new_tokens']} new tokens, {s['repeats']} runs each "
            f"({s.get('estimator', 'median')} estimator); load average "
            f"{s['loadavg_at_start']} at the start, {s['loadavg_at_end']} at the end.\n\n")
    text += markdown_table(report["results"])
    for r in report["results"]:
        if r.get("skipped"):
            text += f"\nContext {r['context']}, batch {r['batch']} skipped: {r['skipped']}.\n"
    short = [r for r in report["results"] if r.get("peer_steps_per_run", s["new_tokens"])
             < s["new_tokens"]]
    if short:
        text += ("\nThe peer timed fewer steps per run where its steps are slow (`--peer-budget`): "
                 + ", ".join(f"context {r['context']} batch {r['batch']}: "
                             f"{r['peer_steps_per_run']}" for r in short) + ".\n")
    if report["targets"]:
        text += "\nTargets (context 128, 32 new tokens):\n\n"
        for t in report["targets"]:
            fmt = (lambda v: f"{v:.2f}×") if "peer" in t["target"] else (lambda v: f"{100 * v:.0f}%")
            verdict = "met" if t["met"] else f"missed by {fmt(t['shortfall'])}"
            text += f"- {t['target']}: {fmt(t['value'])} (target ≥ {fmt(t['required'])}): {verdict}\n"
    return text


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(max(7.0, 4.2 * len(contexts)), 4.2),
                             squeeze=False, sharey=True)
    for ax, ctx in zip(axes[0], contexts):
        pts = sorted((r for r in rows if r["context"] == ctx), key=lambda r: r["batch"])
        b = [r["batch"] for r in pts]
        ax.plot(b, [r["roofline_tokens_per_s"] for r in pts], "k--", marker=".",
                label="roofline")
        ax.plot(b, [r["ours_tokens_per_s"] for r in pts], "o-", color="tab:blue",
                label="ours (JAX)")
        if all(r.get("peer_tokens_per_s") for r in pts):
            ax.plot(b, [r["peer_tokens_per_s"] for r in pts], "s-", color="tab:red",
                    label="eager PyTorch peer")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(b, [str(x) for x in b])
        ax.set_xlabel("batch")
        ax.set_title(f"context {ctx}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("decode tokens/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Decode tokens/s of ours, the eager-PyTorch peer and the memory roofline over "
                    "batch x context, measured interleaved in one run. Context = the length of "
                    "the prompt prefilled (once, shared by the batch's rows) before decoding. The "
                    "full sweep (bench preset, default grid) took about 75 minutes on this "
                    "2-core machine under other jobs' load (see the module docstring).")
    ap.add_argument("--config", default="bench", help="preset or config.json (default bench)")
    ap.add_argument("--batches", type=csv_ints, default=[1, 4, 16, 64])
    ap.add_argument("--contexts", type=csv_ints, default=[128, 1024, 4096],
                    help="prompt lengths prefilled before decoding")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of ours and of the peer")
    ap.add_argument("--seed", type=int, default=0, help="random weights, prompts, first tokens")
    ap.add_argument("--flush-mb", type=int, default=1024,
                    help="MiB rewritten before each run to evict the caches (0: no flush)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the peer (default: the cores JAX uses)")
    ap.add_argument("--no-peer", action="store_true",
                    help="ours and the roofline only (no torch needed)")
    ap.add_argument("--peer-budget", type=float, default=120.0, metavar="SECONDS",
                    help="per point, time at most about this many seconds of peer steps (then "
                         "fewer steps per run, at least 4; the step count is reported); 0: all")
    ap.add_argument("--estimator", choices=("median", "best"), default="median",
                    help="median: medians over runs and steps; best: each side's fastest run "
                         "and the higher roofline (for a machine other jobs load unevenly)")
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: merge these --json reports (e.g. one per context) and "
                         "write their --markdown / --png")
    ap.add_argument("--markdown", default=None, metavar="PATH",
                    help="write the Markdown table and targets to PATH ('-': stdout)")
    ap.add_argument("--png", default=None, metavar="PATH", help="write the plot to PATH")
    ap.add_argument("--json", action="store_true",
                    help="print exactly one JSON document on stdout (logs go to stderr)")
    args = ap.parse_args(argv)
    if args.render:
        return render(args)
    if args.new_tokens < 2 or args.repeats < 1:
        ap.error("--new-tokens must be >= 2 and --repeats >= 1")
    if args.json and args.markdown == "-":
        ap.error("--markdown - and --json both want stdout")

    bp = None
    if not args.no_peer:
        try:
            import bench_peer as bp
        except ImportError as e:
            ap.error(f"cannot import the peer ({e}); use --no-peer")
        if bp.torch is None:
            ap.error("the peer needs torch (pip install -e '.[peer]'); or use --no-peer")

    params, cfg = step3_jax.load(config=args.config, seed=args.seed, progress=False)
    if cfg.dtype != "float32":
        ap.error("the sweep runs float32")
    too_long = [c for c in args.contexts if c + args.new_tokens > cfg.max_position_embedding]
    if too_long:
        ap.error(f"context {too_long[0]} + {args.new_tokens} new tokens exceeds the config's "
                 f"context ({cfg.max_position_embedding})")
    setting = {"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
               "torch": None if bp is None else bp.torch.__version__,
               "threads": None, "backend": jax.default_backend(),
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "config": cfg.name, "dtype": cfg.dtype, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "flush_mb": args.flush_mb, "seed": args.seed,
               "loadavg_at_start": loadavg()}
    ours = Ours(params, cfg)
    peer, verification = None, None
    if bp is not None:
        peer = bp.build(params, cfg, args.threads)
        setting["threads"] = bp.torch.get_num_threads()
        rng = np.random.default_rng(args.seed)
        check = rng.integers(2, cfg.vocab_size, size=(2, 16))
        log("verifying the peer against step3_jax (2 prompts of 16 tokens, 4 greedy tokens)")
        try:
            verification = bp.verify(peer, params, cfg, check, 4)
        except bp.PeerMismatch as e:
            log(f"error: {e}")
            return 1
        log(f"verified: max scaled logit error {verification['prefill_max_scaled_err']:.1e} "
            f"(prefill), {verification['decode_max_scaled_err']:.1e} (decode); tolerance "
            f"{verification['tolerance']:.0e}; greedy tokens match")
    log(f"# decode sweep: {setting['cpu']}, jax {setting['jax']}, torch {setting['torch']}, "
        f"config {cfg.name}, batches {args.batches}, contexts {args.contexts}, "
        f"{args.new_tokens} new tokens")

    flush = bench.Flusher(args.flush_mb)
    rows, prefill = [], []
    rng = np.random.default_rng(args.seed + 1)
    for context in args.contexts:
        prompt = rng.integers(2, cfg.vocab_size, size=context)
        _, capacity = shape_buckets(context, args.new_tokens, cfg)  # what generate allocates
        log(f"context {context}: prefilling the shared prompt (cache capacity {capacity})")
        ours_cache, ours_s = ours.prefix(prompt, capacity)
        prefixes = {"ours": ours_cache}
        entry = {"context": context, "ours_ms": ours_s * 1e3}
        if peer is not None:
            with bp.torch.inference_mode():
                t0 = time.perf_counter()
                _, prefixes["peer"] = peer.forward(bp.torch.as_tensor(prompt[None]), None)
                entry["peer_ms"] = (time.perf_counter() - t0) * 1e3
        prefill.append(entry)
        log(f"  batch-1 prefill: ours {entry['ours_ms']:.0f} ms"
            + (f", peer {entry['peer_ms']:.0f} ms" if peer is not None else ""))
        for batch in args.batches:
            log(f"context {context}, batch {batch}")
            need, avail = point_memory(cfg, batch, context, args.new_tokens, capacity,
                                       peer is not None), mem_available()
            if avail is not None and 1.25 * need + 0.5e9 > avail:
                reason = (f"needs ~{need / 1e9:.1f} GB beyond the weights, "
                          f"{avail / 1e9:.1f} GB available")
                log(f"  skipped: {reason}")
                rows.append({"context": context, "batch": batch, "skipped": reason})
                continue
            row = measure_point(ours, peer, prefixes, cfg, batch=batch, context=context,
                                new_tokens=args.new_tokens, repeats=args.repeats, flush=flush,
                                rng=rng, peer_budget=args.peer_budget)
            rows.append(row)
            log(f"  ours {row['ours_tokens_per_s']:.1f} tok/s (MBU {100 * row['ours_mbu']:.0f}%)"
                + (f", peer {row['peer_tokens_per_s']:.1f} tok/s, ours/peer "
                   f"{row['ours_over_peer']:.2f}x" if peer is not None else "")
                + f", roofline {row['roofline_tokens_per_s']:.1f} tok/s "
                  f"({row['peak_gbs']:.1f} GB/s)")
        del prefixes
    setting["loadavg_at_end"] = loadavg()
    setting["estimator"] = args.estimator
    rows = [derive(r, args.estimator) for r in rows]
    report = {"setting": setting, "verification": verification, "prefill_batch1": prefill,
              "results": rows, "targets": targets(rows, args.new_tokens)}
    write_outputs(report, args)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def merge(reports: list[dict]) -> dict:
    """Several sweep reports (same config and settings, e.g. one per context) as one."""
    first, last = reports[0]["setting"], reports[-1]["setting"]
    keys = ("config", "new_tokens", "repeats", "jax", "torch")
    for r in reports[1:]:
        if any(r["setting"][k] != first[k] for k in keys):
            raise SystemExit(f"cannot merge reports with different {', '.join(keys)}")
    setting = dict(first)
    if last["date"] != first["date"]:
        setting["date"] = f"{first['date']} to {last['date']}"
    setting["loadavg_at_end"] = last["loadavg_at_end"]
    rows = [row for r in reports for row in r["results"]]
    return {"setting": setting, "verification": reports[0]["verification"],
            "prefill_batch1": [p for r in reports for p in r["prefill_batch1"]],
            "results": rows, "targets": targets(rows, setting["new_tokens"])}


def render(args) -> int:
    reports = []
    for path in args.render:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}: not a bench_decode --json report ({e})")
    report = merge(reports)
    report["results"] = [derive(r, args.estimator) for r in report["results"]]
    report["targets"] = targets(report["results"], report["setting"]["new_tokens"])
    report["setting"]["estimator"] = args.estimator
    write_outputs(report, args)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def write_outputs(report: dict, args) -> None:
    setting, rows = report["setting"], report["results"]
    text = markdown(report)
    if args.markdown != "-":
        log("")
        log(text)
    if args.markdown == "-":
        sys.stdout.write(text)
    elif args.markdown:
        Path(args.markdown).write_text(text)
        log(f"Markdown written to {args.markdown}")
    if args.png:
        load = setting.get("loadavg_at_start")
        plot(rows, args.png, f"decode, {setting['config']} preset, float32, "
                             f"{setting['new_tokens']} new tokens, "
                             f"{setting.get('estimator', 'median')} estimator\n{setting['cpu']} "
                             f"({setting['cores']} cores), {setting['date']}"
                             + (f", 1-min load {load[0]:.1f} at the start" if load else ""))
        log(f"plot written to {args.png}")


if __name__ == "__main__":
    sys.exit(main())
