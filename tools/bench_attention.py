#!/usr/bin/env python3
"""Benchmark MFA attention alone: blocked (online-softmax) vs plain (full scores), on this CPU.

Shapes are the ``bench`` preset's attention (``configs/bench.json``: 16 query heads sharing one K
and one V head of 128), float32, as ``step3_jax.model.blocked_attention`` takes them. All figures come
from one run, so they share one machine state; every time is the best of a few runs after a
compiling warm-up, the variants of one measurement timed round-robin (best, not median: this is
a small shared machine and other load only ever adds time).

1. Peak: a jitted float32 ``[N, N] @ [N, N]`` matmul (``--peak-size``), the compute roofline,
   timed at the start, between prefill and decode, at the end, and in the rounds of every
   prefill row; % of peak uses the best of them all (other load only lowers a peak, so the
   best is the least disturbed; a row's own peak shows how loaded the machine was then).
2. Causal prefill of ``T`` tokens (q_pos = arange, key_len = T, batch 1): plain where its
   ``[1, T, n, T]`` float32 scores fit ``--plain-max-gb``, blocked for each ``q_block x k_block``
   pair of ``--pairs`` at T <= ``--sweep-max`` and, above, for the best pair of the sweep and the
   default (``block_sizes``). GFLOP/s count causal work, half the square:
   ``2 * 2 * n * d * T^2 / 2``.
3. Decode (T = 1) over a cache of ``C`` slots: plain reads all ``C`` slots of every row, blocked
   (``--decode-k-blocks``) only each row's filled blocks. Batch 1 at key_len 1K and at full;
   batch B > 1 ragged: half the rows at 1K, half full. Does a length-following decode pay?

    python tools/bench_attention.py                   # markdown on stdout
    python tools/bench_attention.py --json > a.json   # one JSON document on stdout, markdown on
                                                      # stderr
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from step3_jax.model.attention import plain_attend
from step3_jax.model.blocked_attention import block_sizes, blocked_attend, plain_working_set_bytes

SHORT_LEN = 1024  # the short rows of a ragged decode batch


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def csv_pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in x.split("x")) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=16, help="query heads (bench preset: 16)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim (bench preset: 128)")
    ap.add_argument("--prefill", type=csv_ints,
                    default=csv_ints("128,256,512,1024,2048,4096,8192,16384"),
                    help="prompt lengths (comma-separated; empty to skip)")
    ap.add_argument("--pairs", type=csv_pairs, default=csv_pairs("64x128,128x256,256x256,"
                                                                 "128x512,256x512"),
                    help="q_block x k_block pairs swept (the default pair is always added)")
    ap.add_argument("--sweep-max", type=int, default=4096,
                    help="sweep all pairs up to this T; above, only the best pair and default")
    ap.add_argument("--plain-max-gb", type=float, default=6.0,
                    help="run plain prefill only if its score arrays fit this many GB")
    ap.add_argument("--decode", type=csv_ints, default=csv_ints("4096,16384,32768,65536"),
                    help="decode cache capacities (comma-separated; empty to skip)")
    ap.add_argument("--batches", type=csv_ints, default=csv_ints("1,16"), help="decode batches")
    ap.add_argument("--decode-k-blocks", type=csv_ints, default=csv_ints("512,2048,8192"),
                    help="k_block values tried for blocked decode (default for T = 1: "
                         f"{block_sizes(1, 16, 1 << 20)[1]})")
    ap.add_argument("--peak-size", type=int, default=2048, help="N of the N^3 peak matmul")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed rounds per measurement (at most; decode: 4x)")
    ap.add_argument("--budget-s", type=float, default=4.0,
                    help="stop repeating once a measurement's timed rounds took this many seconds")
    ap.add_argument("--json", action="store_true", help="JSON on stdout, markdown on stderr")
    return ap.parse_args(argv)


def loadavg() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def best_times(jobs: dict, repeats: int, budget_s: float) -> dict:
    """Best wall seconds of each ``fn(*inputs)`` of ``jobs {name: (fn, inputs)}``, after one
    warm-up call each, timed round-robin (one run of each per round, so load from other
    processes spreads over all of them): up to ``repeats`` rounds, fewer once the timed rounds
    took ``budget_s``."""
    for fn, inputs in jobs.values():
        jax.block_until_ready(fn(*inputs))
    best, spent = dict.fromkeys(jobs, float("inf")), 0.0
    for _ in range(max(repeats, 1)):
        for name, (fn, inputs) in jobs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            dt = time.perf_counter() - t0
            best[name], spent = min(best[name], dt), spent + dt
        if spent >= budget_s:
            break
    return best


def peak_job(size: int) -> tuple:
    """The float32 ``[N, N] @ [N, N]`` matmul timed as the compute peak: ``(fn, inputs)``."""
    x = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    return jax.jit(lambda a: a @ a), (x,)


def peak_gflops(size: int, seconds: float) -> float:
    return 2 * size ** 3 / seconds / 1e9


def matmul_peak_gflops(size: int) -> float:
    return peak_gflops(size, best_times({"mm": peak_job(size)}, 10, 1e9)["mm"])


def random_cache(batch: int, t_len: int, s_cap: int, n: int, d: int):
    """``q [B, T, n, d]``, ``k_t [B, d, S]``, ``v [B, S, d]`` float32 unit normals."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    return (jax.random.normal(kq, (batch, t_len, n, d), jnp.float32),
            jax.random.normal(kk, (batch, d, s_cap), jnp.float32),
            jax.random.normal(kv, (batch, s_cap, d), jnp.float32))


def blocked_fn(q_block: int, k_block: int):
    return jax.jit(lambda *a: blocked_attend(*a, q_block=q_block, k_block=k_block))


def prefill_row(t_len: int, pairs, args, log) -> dict:
    """Times of plain (if it fits) and blocked causal prefill of ``t_len`` tokens."""
    n, d = args.heads, args.head_dim
    q, k_t, v = random_cache(1, t_len, t_len, n, d)
    q_pos, key_len = jnp.arange(t_len, dtype=jnp.int32)[None], jnp.asarray([t_len], jnp.int32)
    inputs = (q, k_t, v, q_pos, key_len)
    jobs = {f"{qb}x{kb}": (blocked_fn(qb, kb), inputs) for qb, kb in pairs}
    if plain_working_set_bytes(1, t_len, n, d, t_len) <= args.plain_max_gb * 1e9:
        jobs["plain"] = (plain_attend, inputs)
    jobs["peak"] = peak_job(args.peak_size)  # in the same rounds: the same machine state
    ms = {k: 1e3 * t for k, t in best_times(jobs, args.repeats, args.budget_s).items()}
    peak = peak_gflops(args.peak_size, ms.pop("peak") / 1e3)
    log(f"  prefill T={t_len}: " + ", ".join(f"{k} {t:.1f} ms" for k, t in ms.items())
        + f"; peak {peak:.0f} GFLOP/s")
    qb, kb = block_sizes(t_len, n, t_len)
    row = {"T": t_len, "causal_gflop": 2 * n * d * t_len * t_len / 1e9, "peak_gflops": peak,
           "plain_ms": ms.pop("plain", None), "blocked_ms": ms, "default_pair": f"{qb}x{kb}"}
    row["best_pair"] = min(ms, key=ms.get)
    row["best_ms"], row["default_ms"] = ms[row["best_pair"]], ms[row["default_pair"]]
    for key in ("best", "plain"):
        t = row[f"{key}_ms"]
        row[f"{key}_gflops"] = row["causal_gflop"] / t * 1e3 if t else None
    return row


def bench_prefill(args, log) -> list[dict]:
    """Prefill rows; pairs are swept up to ``--sweep-max``, then only the best one and the
    default are run."""
    rows, best_pair = [], None
    for t_len in args.prefill:
        pairs = set(args.pairs)
        if t_len > args.sweep_max and best_pair is not None:
            pairs = {best_pair}
        row = prefill_row(t_len, sorted(pairs | {block_sizes(t_len, args.heads, t_len)}),
                          args, log)
        if t_len <= args.sweep_max:
            best_pair = tuple(int(x) for x in row["best_pair"].split("x"))
        rows.append(row)
    return rows


def decode_cases(batch: int, s_cap: int) -> list[tuple[str, list[int]]]:
    """(label, key_len per row): batch 1 short and full; larger batches half short, half full."""
    short = min(SHORT_LEN, s_cap)
    if batch == 1:
        return [("1K", [short]), ("full", [s_cap])]
    return [("ragged", [short] * (batch // 2) + [s_cap] * (batch - batch // 2))]


def bench_decode(args, log) -> list[dict]:
    """Decode rows: plain and blocked (each ``--decode-k-blocks``) per capacity, batch, case."""
    n, d = args.heads, args.head_dim
    rows = []
    for s_cap in args.decode:
        for batch in args.batches:
            q, k_t, v = random_cache(batch, 1, s_cap, n, d)
            for label, lens in decode_cases(batch, s_cap):
                key_len = jnp.asarray(lens, jnp.int32)
                inputs = (q, k_t, v, (key_len - 1)[:, None], key_len)
                jobs = {"plain": (plain_attend, inputs)} | {
                    str(kb): (blocked_fn(1, kb), inputs) for kb in args.decode_k_blocks}
                ms = {k: 1e3 * t for k, t in best_times(jobs, 4 * args.repeats,
                                                        args.budget_s).items()}
                row = {"S": s_cap, "batch": batch, "lengths": label,
                       "filled_mb": sum(lens) * d * 2 * 4 / 1e6,
                       "filled_gflop": sum(lens) * 4 * n * d / 1e9,
                       "plain_ms": ms.pop("plain"), "blocked_ms": ms}
                best = min(ms, key=ms.get)
                row["best_k_block"], row["best_ms"] = int(best), ms[best]
                log(f"  decode S={s_cap} B={batch} {label}: plain {row['plain_ms']:.2f} ms, "
                    f"blocked {row['best_ms']:.2f} ms (k_block {row['best_k_block']})")
                rows.append(row)
            del q, k_t, v
    return rows


def fmt(x, spec=".1f", suffix="") -> str:
    return "—" if x is None else format(x, spec) + suffix


def auto_threshold(prefill: list[dict]) -> int | None:
    """Smallest measured T from which blocked (default blocks) beats plain at every longer
    measured T."""
    threshold = None
    for row in reversed(prefill):
        if row["plain_ms"] is not None and row["plain_ms"] < row["default_ms"]:
            break
        threshold = row["T"]
    return threshold


def prefill_markdown(rows: list[dict], peak: float) -> list[str]:
    pairs = sorted({p for r in rows for p in r["blocked_ms"]},
                   key=lambda p: tuple(int(x) for x in p.split("x")))
    out = ["## Causal prefill (GFLOP/s count half the square)", "",
           "| T | plain ms | plain GF/s | default blocked ms | best blocked ms | best GF/s "
           "| row's peak GF/s | best % peak | plain / default |", "|---" * 9 + "|"]
    for r in rows:
        ratio = r["plain_ms"] / r["default_ms"] if r["plain_ms"] else None
        out.append(f"| {r['T']} | {fmt(r['plain_ms'])} | {fmt(r['plain_gflops'])} "
                   f"| {r['default_ms']:.1f} ({r['default_pair']}) "
                   f"| {r['best_ms']:.1f} ({r['best_pair']}) | {r['best_gflops']:.1f} "
                   f"| {r['peak_gflops']:.0f} | {100 * r['best_gflops'] / peak:.0f}% "
                   f"| {fmt(ratio, '.2f', 'x')} |")
    out += ["", "Blocked sweep (ms, q_block x k_block):", "",
            "| T | " + " | ".join(pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
    out += [f"| {r['T']} | " + " | ".join(fmt(r["blocked_ms"].get(p)) for p in pairs) + " |"
            for r in rows]
    return out + [""]


def decode_markdown(rows: list[dict], k_blocks: list[int]) -> list[str]:
    out = ["## Decode (T = 1): plain over the whole cache vs blocked over filled blocks", "",
           "| S | batch | key_len | filled MB | plain ms | "
           + " | ".join(f"blocked kb={k} ms" for k in k_blocks)
           + " | best blocked GF/s | plain / best blocked |", "|---" * (7 + len(k_blocks)) + "|"]
    for r in rows:
        out.append(f"| {r['S']} | {r['batch']} | {r['lengths']} | {r['filled_mb']:.1f} "
                   f"| {r['plain_ms']:.2f} | "
                   + " | ".join(fmt(r["blocked_ms"][str(k)], ".2f") for k in k_blocks)
                   + f" | {r['filled_gflop'] / r['best_ms'] * 1e3:.1f} "
                   f"| {r['plain_ms'] / r['best_ms']:.2f}x |")
    return out + [""]


def markdown(doc: dict) -> str:
    peaks = ", ".join(f"{p:.0f}" for p in doc["peak_gflops_runs"])
    out = [f"# MFA attention: blocked vs plain ({doc['date']})", "",
           f"- machine: {doc['cpus']} CPUs, jax {doc['jax']}, {doc['backend']}",
           f"- load at start: `{doc['load_start']}`", f"- load at end: `{doc['load_end']}`",
           f"- float32 matmul peak ({doc['peak_size']}^3, start / mid / end): {peaks} GFLOP/s;"
           f" best of these and the rows' own: {doc['peak_gflops']:.0f} (% peak uses it)",
           f"- shapes: batch 1 prefill, {doc['heads']} heads x {doc['head_dim']}, one shared "
           "K/V head; times are best-of-runs, interleaved", ""]
    if doc["prefill"]:
        out += prefill_markdown(doc["prefill"], doc["peak_gflops"])
        out += [f"auto threshold (default blocked beats plain from this measured T on): "
                f"{doc['auto_threshold']}", ""]
    if doc["decode"]:
        out += decode_markdown(doc["decode"], doc["decode_k_blocks"])
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    doc = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
           "jax": jax.__version__, "backend": jax.default_backend(), "load_start": loadavg(),
           "heads": args.heads, "head_dim": args.head_dim, "peak_size": args.peak_size,
           "decode_k_blocks": args.decode_k_blocks,
           "peak_gflops_runs": [matmul_peak_gflops(args.peak_size)]}
    log(f"matmul peak: {doc['peak_gflops_runs'][0]:.0f} GFLOP/s")
    doc["prefill"] = bench_prefill(args, log)
    doc["auto_threshold"] = auto_threshold(doc["prefill"])
    doc["peak_gflops_runs"].append(matmul_peak_gflops(args.peak_size))
    doc["decode"] = bench_decode(args, log)
    doc["peak_gflops_runs"].append(matmul_peak_gflops(args.peak_size))
    doc["peak_gflops"] = max(doc["peak_gflops_runs"] + [r["peak_gflops"] for r in doc["prefill"]])
    doc["load_end"] = loadavg()
    table = markdown(doc)
    if args.json:
        print(json.dumps(doc, indent=1))
        print(table, file=sys.stderr)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
