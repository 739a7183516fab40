"""Building and driving an :class:`~step3_jax.runtime.engine.Engine`: :func:`make_engine` (one
device, a colocated mesh, or AFD's groups, with the pool sized before it is allocated),
:func:`generate_requests` (``generate``'s contract through the engine) and the offline
throughput run over a request mix that ``step3-jax bench --requests`` reports."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from step3_jax.errors import Step3Error
from step3_jax.model.config import (DEFAULT_DECODE_STEPS, DEFAULT_MAX_NUM_SEQS,
                                    DEFAULT_PAGE_SIZE, DEFAULT_PREFILL_CHUNK, Step3Config)
from step3_jax.runtime import engine_pages
from step3_jax.runtime.engine import Engine
from step3_jax.runtime.engine_pages import check_engine_args
from step3_jax.runtime.metrics import CompileClock


def make_engine(params, cfg: Step3Config, *, mesh=None, afd=None, max_num_seqs: int =
                DEFAULT_MAX_NUM_SEQS, page_size: int = DEFAULT_PAGE_SIZE,
                num_pages: int | None = None, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                decode_steps: int = DEFAULT_DECODE_STEPS,
                max_model_len: int | None = None) -> Engine:
    """An :class:`Engine` on one device or a colocated mesh (``params`` placed by ``load``;
    ``mesh`` defaults to theirs), or, with ``afd`` (an ``afd.AfdModel``), on AFD's two groups.
    ``num_pages`` None: :func:`engine_pages.default_num_pages`; an explicit pool the device
    cannot hold is refused before it is allocated."""
    from step3_jax.runtime.generate import _mesh_of

    check_engine_args(max_num_seqs, page_size, num_pages or 1, prefill_chunk, decode_steps)
    max_len = min(max_model_len or cfg.max_position_embedding, cfg.max_position_embedding)
    itemsize = np.dtype(cfg.dtype).itemsize
    if afd is not None:
        device = afd.attn_devices[0]
    else:
        mesh = mesh or _mesh_of(params)
        device = next(iter(mesh.devices.flat))
    if num_pages is None:
        num_pages = engine_pages.default_num_pages(
            cfg, page_size=page_size, max_num_seqs=max_num_seqs, max_model_len=max_len,
            piece=prefill_chunk or max_len, itemsize=itemsize, device=device)
    else:
        engine_pages.check_pool_fits(cfg, num_pages, page_size, itemsize, device)
    if afd is not None:
        from step3_jax.runtime.engine_afd import AfdRunner

        runner = AfdRunner(afd, num_pages, page_size, max_num_seqs)
    else:
        from step3_jax.runtime.engine_steps import DeviceRunner

        runner = DeviceRunner(params, cfg, mesh, num_pages, page_size)
    return Engine(runner, cfg, max_num_seqs=max_num_seqs, page_size=page_size,
                  num_pages=num_pages, prefill_chunk=prefill_chunk, decode_steps=decode_steps,
                  max_model_len=max_len)


def program_shapes(engine: Engine) -> tuple[list[tuple[int, int]], list[int]]:
    """Every shape the engine's programs can be asked for: ``(prefill chunk, table width)``
    pairs and decode table widths (stop-id lists up to ``MIN_STOP_WIDTH`` ids; a request with
    more compiles one more decode program when it runs)."""
    from step3_jax.runtime.engine_pages import bucket_pow2
    from step3_jax.runtime.generate import MIN_PREFILL_BUCKET, bucket

    page = engine.page_size
    width = lambda pages: bucket_pow2(pages, engine.min_width, engine.max_pages)  # noqa: E731
    widths = sorted({width(n) for n in range(1, engine.max_pages + 1)})
    longest = min(engine.prefill_chunk or engine.max_model_len, engine.max_model_len)
    chunks: dict[int, int] = {}  # chunk length -> the fewest real tokens it carries
    for n in range(longest, 0, -1):
        chunks[min(bucket(n, MIN_PREFILL_BUCKET), bucket_pow2(n, MIN_PREFILL_BUCKET))] = n
    prefill = [(c, w) for c in sorted(chunks) for w in widths if w >= width(-(-chunks[c] // page))]
    return prefill, widths


def compile_programs(engine: Engine, progress: bool = True) -> dict:
    """Run every program shape :func:`program_shapes` lists once on dummy rows (page 0 of an
    idle pool; no request sees it), so a server compiles at startup and not on its first
    requests. Refused while requests are in flight. Returns the counts and the seconds."""
    from tqdm import tqdm

    from step3_jax.runtime.engine import MIN_STOP_WIDTH, Request, _decode_rows

    if engine.has_unfinished():
        raise RuntimeError("compile_programs needs an idle engine")
    prefill, widths = program_shapes(engine)
    dummy = Request("", [0], 1)
    groups = range(engine.groups)  # AFD: each attention device compiles its own programs
    started = time.perf_counter()
    with tqdm(total=len(prefill) * len(groups) + len(widths), desc="compiling", unit="program",
              disable=not progress, leave=False) as bar:
        for chunk, width in prefill:
            for g in groups:
                token = engine.runner.prefill(
                    g, np.zeros((1, chunk), np.int32), np.zeros((1, width), np.int32),
                    np.zeros(1, np.int32), np.ones(1, np.int32), engine._knobs([dummy]))
                np.asarray(token)
                bar.update()
        rows = _decode_rows([None] * engine.max_num_seqs, MIN_STOP_WIDTH, engine._knobs)
        for width in widths:
            engine.runner.decode(engine.decode_steps, rows,
                                 np.zeros((engine.max_num_seqs, width), np.int32))
            bar.update()
    return {"prefill_programs": len(prefill) * len(groups), "decode_programs": len(widths),
            "seconds": round(time.perf_counter() - started, 3)}


def generate_requests(engine: Engine, prompts: Sequence[Sequence[int]], *,
                      max_new_tokens: int | Sequence[int], temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                      eos_ids: Sequence[int] | None = None):
    """``generate``'s contract through the engine: every prompt queued at once (request ``i``
    seeded ``seed + i``; ``max_new_tokens`` one budget for all or one per prompt), run to
    completion; ``(results in prompt order, metrics)``. Every request is checked before any
    is queued."""
    budgets = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
               else list(max_new_tokens))
    if not prompts:
        raise Step3Error("no prompt given")
    ids = []
    try:
        for i, (p, n) in enumerate(zip(prompts, budgets)):
            ids.append(engine.add_request(p, max_tokens=n, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed + i, stop_ids=eos_ids))
    except Step3Error:
        for i in ids:
            engine.cancel(i)
        raise
    started = time.perf_counter()
    with CompileClock() as clock:
        engine.run()
    wall = time.perf_counter() - started
    return [engine.result(i) for i in ids], summarize(engine, ids, wall, clock.seconds())


def _pct(values: list[float], q: float) -> float | None:
    return round(1e3 * float(np.percentile(values, q)), 3) if values else None


def summarize(engine: Engine, ids: Sequence[str], wall_s: float, compile_s: float) -> dict:
    """The engine's counters plus the requests' latencies (milliseconds: mean time to first
    token, p50/p90 time per output token, the worst inter-token gap) and throughput over the
    wall time less compilation."""
    timings = [engine.requests[i].timings() for i in ids]
    ttft = [t["ttft_s"] for t in timings if t["ttft_s"] is not None]
    tpot = [t["tpot_s"] for t in timings if t["tpot_s"] is not None]
    itl = [g for t in timings for g in t["itl_s"]]
    run_s = max(wall_s - compile_s, 1e-9)
    generated = sum(len(engine.requests[i].generated) for i in ids)
    return engine.metrics() | {
        "requests": len(ids), "compile_s": round(compile_s, 3),
        "wall_s": round(wall_s, 3), "output_tokens_per_s": round(generated / run_s, 2),
        "ttft_ms_mean": round(1e3 * float(np.mean(ttft)), 3) if ttft else None,
        "tpot_ms_p50": _pct(tpot, 50), "tpot_ms_p90": _pct(tpot, 90),
        "itl_ms_max": round(1e3 * max(itl), 3) if itl else None,
        "kv_bytes_peak": engine.stats["peak_pages"] * engine.page_bytes,
        "placement": engine.runner.placement}


def request_mix(n: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int],
                vocab_size: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``n`` random prompts with lengths uniform in ``prompt_lens`` and budgets uniform in
    ``output_lens`` (both inclusive), seeded: the offline-throughput mix."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(prompt_lens[0], prompt_lens[1] + 1, n)
    budgets = rng.integers(output_lens[0], output_lens[1] + 1, n)
    prompts = [rng.integers(0, vocab_size, int(k)).tolist() for k in lens]
    return prompts, [int(b) for b in budgets]
