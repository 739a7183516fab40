"""Decode benchmarking: the machine's memory roofline and the decode step measured against it.

Everything a figure is compared with is measured in the same run (this is a shared machine whose
bandwidth drifts): :func:`roofline` times a jitted float32 ``[1, 8192] x [8192, 8192]`` matvec
in both weight layouts and keeps the faster;
:func:`run` generates on the given config and reports the decode step time with the bytes that
step must read, so ``mbu = bytes_per_step / decode_step / peak_bandwidth``.

Bytes per step (:func:`bytes_per_step`), from the weight declaration: every non-expert weight
once (the embedding only for the ``batch`` rows it gathers), each MoE layer's routed experts for
the *expected* number of distinct experts the batch touches under uniform routing,
``E * (1 - (1 - k/E) ** batch)``, and the KV cache as the kernel reads it (the whole capacity,
K and V, every layer).

An MBU over 1 cannot be right: the step would read faster than the machine can. It happens when
the probe ran while the machine was busy (a shared machine: 5-16 GB/s probes beside steps that
were not slowed) or when the bytes a step reads fit in the CPU's last-level cache, so the step
reads cache, not DRAM. :func:`plausibility` flags both in the report (``mbu_over_1``,
``fits_in_cache``, ``warnings``) and on stderr.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from step3_jax.errors import Step3Error
from step3_jax.model.config import Step3Config
from step3_jax.model.weights import declare, is_spec

ROOFLINE_N = 8192
CPU_CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"
_log = logging.getLogger("step3_jax")


class Flusher:
    """Rewrites a buffer larger than the last-level cache so the next run starts from DRAM."""

    def __init__(self, megabytes: int):
        self.buf = None
        if megabytes > 0:
            self.buf = jnp.zeros((megabytes * (1 << 20) // 4,), jnp.float32)
            self._step = jax.jit(lambda b: b + 1.0, donate_argnums=0)
            self()

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf = jax.block_until_ready(self._step(self.buf))


def time_fn(fn, args, repeats: int, flush: Flusher, warmup: int = 2) -> dict:
    """Compile, warm up, then the wall time of ``repeats`` runs (each after a cache flush)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        flush()
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "compile_s": compile_s}


def roofline(repeats: int, flush: Flusher, seed: int = 0) -> dict:
    """Weight-read bandwidth of a jitted float32 ``[1, 8192] x [8192, 8192]`` matvec: the faster
    of the two weight layouts, ``x @ w`` on ``[in, out]`` and ``layers.linear`` on ``[out, in]``
    (the model's), so the roofline is the best this machine reads, not the layout we happen to
    use (``[out, in]`` measured 1.1-1.2x faster here; tools/bench_layout.py)."""
    from step3_jax.model.layers import linear

    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (1, ROOFLINE_N), jnp.float32)
    w = jax.random.normal(kw, (ROOFLINE_N, ROOFLINE_N), jnp.float32)
    nbytes = ROOFLINE_N * ROOFLINE_N * 4
    forms = {"in_out": lambda x, w: x @ w, "out_in": linear}  # same bytes, either layout
    median = {name: time_fn(jax.jit(fn), (x, w), repeats, flush)["median_s"]
              for name, fn in forms.items()}
    del w
    best = min(median, key=median.get)
    return {"shape": f"float32 [1, {ROOFLINE_N}] x [{ROOFLINE_N}, {ROOFLINE_N}]",
            "weight_bytes": nbytes, "layout": best, "median_ms": median[best] * 1e3,
            "gb_per_s": nbytes / median[best] / 1e9,
            "gb_per_s_by_layout": {k: nbytes / t / 1e9 for k, t in median.items()}}


def expected_distinct_experts(experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts ``batch`` tokens touch when each picks ``top_k`` uniformly."""
    return experts * (1.0 - (1.0 - top_k / experts) ** batch)


def bytes_per_step(cfg: Step3Config, batch: int, capacity: int) -> dict:
    """Bytes one decode step of ``batch`` sequences must read (see the module docstring)."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    weights = experts = 0.0
    distinct = (expected_distinct_experts(cfg.moe_num_experts, cfg.moe_top_k, batch)
                if cfg.moe_layers else 0.0)
    for spec in jax.tree.leaves(declare(cfg), is_leaf=is_spec):
        size = math.prod(spec.shape) * itemsize
        if spec.hub == "model.embed_tokens.weight":
            weights += batch * cfg.hidden_size * itemsize
        elif "expert_mlp" in spec.axes:  # routed experts (not the router)
            experts += size / spec.shape[0] * distinct
        else:
            weights += size
    kv = cfg.num_hidden_layers * 2 * batch * capacity * cfg.head_dim * itemsize
    return {"weights": weights, "experts": experts, "kv": kv, "total": weights + experts + kv,
            "expected_distinct_experts_per_layer": distinct}


def last_level_cache_bytes(cache_dir: str = CPU_CACHE_DIR) -> int | None:
    """The CPU's largest cache from sysfs (``index*/size``: ``32768K``, ``16M``), else what
    ``os.sysconf`` says of L3 or L2; None where neither knows."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in glob.glob(os.path.join(cache_dir, "index*", "size")):
        try:
            text = open(path).read().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError, IndexError):
            continue
    if not sizes:
        for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
            try:
                sizes.append(os.sysconf(name))
            except (ValueError, OSError):  # a name this platform does not know
                pass
    return max((s for s in sizes if s > 0), default=None)


def plausibility(bytes_per_step: float, mbu: float, step_ms: float, peak_gbs: float,
                 backend: str) -> dict:
    """Whether the MBU can be right: ``mbu_over_1``, the CPU's last-level cache (``cache_bytes``,
    None when unknown or not on CPU), whether a step's bytes fit in it (``fits_in_cache``,
    None when unknown), and a ``warnings`` line for each problem (also logged)."""
    cache = last_level_cache_bytes() if backend == "cpu" else None
    fits = None if cache is None else bytes_per_step <= cache
    warnings = []
    if mbu > 1:
        warnings.append(
            f"MBU {mbu:.3f} is over 1, which cannot be right: the bandwidth probe read "
            f"{peak_gbs:.1f} GB/s but the decode step {bytes_per_step / step_ms / 1e6:.1f} GB/s "
            "(a busy machine slows the probe; the step's bytes may sit in cache): not a "
            "measurement of this machine's MBU")
    if fits:
        warnings.append(
            f"the {bytes_per_step / 1e6:.1f} MB a step reads fit in the CPU's "
            f"{cache / 1e6:.1f} MB last-level cache: the step may read cache, not DRAM, so the "
            "MBU against the DRAM probe overstates it")
    for w in warnings:
        _log.warning("%s", w)
    return {"mbu_over_1": mbu > 1, "cache_bytes": cache, "fits_in_cache": fits,
            "warnings": warnings}


AFD_MIN_NEW_TOKENS = 4  # afd.generate times decode steps from the second on, one is traced


def run(params, cfg: Step3Config, *, batch: int, prompt_len: int, new_tokens: int,
        repeats: int = 3, flush_mb: int = 1024, seed: int = 0, log=None, afd_model=None,
        schedule: str = "pipelined", prefill_chunk: int | None = None) -> dict:
    """Benchmark decode on ``params``: the report ``step3-jax bench --json`` prints.

    Prompts are random token ids (greedy decoding, no EOS, so every sequence decodes exactly
    ``new_tokens``). The first call compiles; then ``repeats`` timed calls, each after a cache
    flush, and the medians of their prefill time and per-step decode time.

    ``afd_model`` (an ``afd.AfdModel``; ``params`` is then unused): the same through
    ``afd.generate``, whose metrics have the same schema (``runtime/metrics.py``: its decode
    step is the median of each run's unprofiled steps after the first); the report adds
    ``placement`` and ``afd`` (the byte counts, and the median over the runs of each traced
    stage metric, ``afd_trace.summarize``). ``bytes_per_step``
    is the same model-level figure as colocated: AFD's micro-batches each re-read the experts
    they touch, so its real traffic is higher. ``prefill_chunk``: as ``Generator``'s (default
    its default; AFD prefills the whole prompt in one pass).
    """
    from step3_jax.runtime.generate import Generator

    log = log or (lambda *a: None)
    if afd_model is not None and new_tokens < AFD_MIN_NEW_TOKENS:
        raise Step3Error(f"--new-tokens must be >= {AFD_MIN_NEW_TOKENS} with --afd, got "
                         f"{new_tokens}")
    flush = Flusher(flush_mb)
    log("measuring the memory roofline")
    roof = roofline(10, flush, seed)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(2, cfg.vocab_size, size=(batch, prompt_len)).tolist()
    if afd_model is None:
        gen = (Generator(params, cfg) if prefill_chunk is None
               else Generator(params, cfg, prefill_chunk=prefill_chunk))
    else:
        from step3_jax.runtime import afd

        gen = functools.partial(afd.generate, afd_model, schedule=schedule)
    log(f"compiling and warming up (batch {batch}, prompt {prompt_len}, {new_tokens} new tokens)")
    _, first = gen(prompts, max_new_tokens=new_tokens, eos_ids=[])
    runs = []
    for i in range(repeats):
        flush()
        _, m = gen(prompts, max_new_tokens=new_tokens, eos_ids=[])
        runs.append(m)
        log(f"run {i + 1}/{repeats}: decode {m['decode_step_ms']:.2f} ms/step, "
            f"prefill {m['prefill_ms']:.1f} ms")
    step_ms = statistics.median(m["decode_step_ms"] for m in runs)
    need = bytes_per_step(cfg, batch, first["cache_capacity"])
    peak = roof["gb_per_s"] * 1e9
    mbu = need["total"] / (step_ms / 1e3) / peak
    out = {
        "config": cfg.name, "dtype": cfg.dtype, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "mesh": first["mesh"], "backend": jax.default_backend(),
        "jax": jax.__version__, "cache_capacity": first["cache_capacity"],
        "decode_step_ms": step_ms,
        "decode_tokens_per_s": batch * 1e3 / step_ms,
        "prefill_ms": statistics.median(m["prefill_ms"] for m in runs),
        "compile_s": first["compile_s"],
        "bytes_per_step": need["total"], "bytes_breakdown": need,
        "peak_bandwidth_gbs": roof["gb_per_s"],
        "peak_bandwidth_gbs_by_layout": roof["gb_per_s_by_layout"],
        "mbu": mbu,
        **plausibility(need["total"], mbu, step_ms, roof["gb_per_s"], jax.default_backend()),
        "repeats": repeats, "runs_decode_step_ms": [m["decode_step_ms"] for m in runs],
    }
    if afd_model is not None:
        out["placement"] = first["placement"]
        out["afd"] = _median_afd([m["afd"] for m in runs])
    return out


def _median_afd(runs: list[dict]) -> dict:
    """The runs' ``afd`` metrics: the fixed ones as reported, each measured one's median."""
    out = {k: v for k, v in runs[0].items() if not isinstance(v, float)}
    timed = [r for r in runs if r.get("timeline_source")]
    for key in {k for r in timed for k, v in r.items() if isinstance(v, float)}:
        out[key] = statistics.median(r[key] for r in timed)
    return out


# ----- shared by the benchmark tools (tools/bench_*.py) --------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for a benchmark's setting."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages: how busy the shared machine was during a run."""
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except (OSError, ValueError):
        return None


def csv_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers."""
    import argparse

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
