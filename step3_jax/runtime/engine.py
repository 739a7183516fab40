"""The continuous-batching engine: a stream of requests over a paged KV cache.

``generate`` runs one static batch; the engine serves requests that arrive and finish at any
time (the paper's decode service). Each :meth:`Engine.step`:

1. **admits** waiting requests first-come first-served into free slots (at most
   ``max_num_seqs`` running), when the pool has pages for their first prefill chunk;
2. **prefills** admitted requests in chunks, at most ``prefill_chunk`` prompt tokens per step in
   all, so sequences already decoding keep a bounded inter-token latency while a long prompt
   enters (0: each prompt whole, in one step);
3. **decodes** every running sequence for up to ``decode_steps`` tokens in one on-device loop
   (:func:`engine_steps.decode_burst`), which returns early when a sequence finishes.

Pages (``page_size`` token positions per layer each, a pool of ``num_pages``) are taken as a
sequence grows and returned the moment it finishes or is cancelled. When a sequence needs a page
and none is free, the most recently admitted sequence is **preempted**: its pages are freed, it
goes back to the head of the queue, and when it is admitted again its prompt and the tokens it
had generated are prefilled anew (recomputation). Sampling is seeded per request and per token
index, so a preempted request finishes with the tokens it would have produced anyway. A request
that could never fit (prompt + budget past the context or the whole pool) is refused when it is
added. Requests, results and metrics are plain Python; the runner
(:class:`engine_steps.DeviceRunner`, or AFD's :class:`engine_afd.AfdRunner`) owns the device side.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Callable, Sequence

import jax
import numpy as np

from step3_jax.errors import Step3Error
from step3_jax.model.config import DEFAULT_DECODE_STEPS, DEFAULT_PREFILL_CHUNK, Step3Config
from step3_jax.model.paged import page_bytes
from step3_jax.runtime import sampling
from step3_jax.runtime.engine_pages import PagePool, bucket_pow2, check_engine_args
from step3_jax.runtime.generate import MIN_PREFILL_BUCKET, GenerationResult, bucket, check_eos

MIN_TABLE_TOKENS = 512
MIN_STOP_WIDTH = 4  # stop-id lists are padded to at least this many (one program for most)


@dataclasses.dataclass
class Request:
    """One request and its engine-side state."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    generated: list[int] = dataclasses.field(default_factory=list)
    status: str = "waiting"          # waiting | prefilling | decoding | finished
    finish_reason: str | None = None  # eos | length | cancelled
    cached: int = 0                   # positions held in its pages
    pages: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    admitted: int = -1                # admission order (preemption takes the largest)
    preemptions: int = 0
    arrival: float = 0.0
    token_times: list[float] = dataclasses.field(default_factory=list)  # delivery time per token

    @property
    def prefix(self) -> list[int]:
        """What the cache must hold before the next token: the prompt and every generated token
        (while decoding, the last one is fed by the next step)."""
        return self.prompt + self.generated

    def timings(self) -> dict:
        """Time to first token, time per output token, inter-token latencies (seconds; a burst
        delivers several tokens at once, so latencies are the gaps between deliveries)."""
        t = self.token_times
        gaps = [b - a for a, b in zip(t, t[1:]) if b > a]
        return {"ttft_s": t[0] - self.arrival if t else None,
                "tpot_s": (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
                "itl_s": gaps, "e2e_s": t[-1] - self.arrival if t else None,
                "preemptions": self.preemptions}


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for a request: its new tokens and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


class Engine:
    """Continuous batching over a paged KV cache; see the module docstring.

    ``runner``: the device side (:class:`~step3_jax.runtime.engine_steps.DeviceRunner` or
    :class:`~step3_jax.runtime.engine_afd.AfdRunner`); build both with
    :func:`step3_jax.runtime.engine_setup.make_engine`.
    """

    def __init__(self, runner, cfg: Step3Config, *, max_num_seqs: int, page_size: int,
                 num_pages: int, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 decode_steps: int = DEFAULT_DECODE_STEPS, max_model_len: int | None = None):
        check_engine_args(max_num_seqs, page_size, num_pages, prefill_chunk, decode_steps)
        self.runner, self.cfg = runner, cfg
        self.max_num_seqs, self.page_size, self.decode_steps = max_num_seqs, page_size, decode_steps
        self.prefill_chunk = prefill_chunk or None
        self.max_model_len = min(max_model_len or cfg.max_position_embedding,
                                 cfg.max_position_embedding)
        # One pool per group of slots: AFD's attention devices each hold their own sequences'
        # pages (slot s on device s % groups); one device or a colocated mesh: one pool.
        self.groups = getattr(runner, "groups", 1)
        if max_num_seqs % self.groups:
            raise Step3Error(f"--max-num-seqs {max_num_seqs} must be a multiple of the "
                             f"{self.groups} attention devices")
        self.pools = [PagePool(num_pages) for _ in range(self.groups)]
        self.num_pages = num_pages
        self.max_pages = -(-self.max_model_len // page_size)
        # Page tables are passed at power-of-two widths (one compiled program per width), at
        # least MIN_TABLE_TOKENS positions wide: short sequences share one program.
        self.min_width = min(self.max_pages, max(1, MIN_TABLE_TOKENS // page_size))
        self.page_bytes = page_bytes(cfg, page_size, np.dtype(cfg.dtype).itemsize)
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * max_num_seqs
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._admissions = itertools.count()
        self.stats = collections.Counter()
        self.busy_s = 0.0

    def reset_stats(self) -> None:
        """Zero the counters :meth:`metrics` reports (between a warm-up and a timed run)."""
        self.stats.clear()
        self.busy_s = 0.0

    # ----- requests ------------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    stop_ids: Sequence[int] | None = None, request_id: str | None = None) -> str:
        """Queue a request; returns its id. ``stop_ids`` defaults to the config's EOS ids
        (``[-1]`` or ``[]``: none). Refused with a one-line :class:`Step3Error` when a setting
        is out of range or the request could never fit the context or the page pool."""
        cfg = self.cfg
        if request_id is None:
            request_id = next(str(i) for i in self._ids if str(i) not in self.requests)
        request_id = str(request_id)
        if request_id in self.requests:
            raise Step3Error(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise Step3Error(f"request {request_id}: the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise Step3Error(f"request {request_id}: token id {bad[0]} is outside the "
                             f"vocabulary (0..{cfg.vocab_size - 1})")
        if max_tokens < 1:
            raise Step3Error(f"request {request_id}: max_tokens must be >= 1, got {max_tokens}")
        sampling.check(temperature, top_k, top_p)
        stop_ids = list(cfg.eos_token_ids if stop_ids is None else stop_ids)
        check_eos(stop_ids, cfg)
        stop_ids = tuple(t for t in stop_ids if t >= 0)
        need = len(prompt) + max_tokens - 1  # the last token is never fed back
        if need > self.max_model_len:
            raise Step3Error(f"request {request_id}: prompt ({len(prompt)} tokens) + max_tokens "
                             f"({max_tokens}) - 1 = {need} positions, more than the context "
                             f"({self.max_model_len})")
        pages = -(-need // self.page_size)
        if pages > self.num_pages:
            raise Step3Error(f"request {request_id}: needs {pages} pages of {self.page_size} "
                             f"tokens, more than the whole pool (--num-pages {self.num_pages})")
        req = Request(request_id, prompt, int(max_tokens), float(temperature), int(top_k),
                      float(top_p), int(seed), stop_ids, arrival=time.perf_counter())
        self.requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def cancel(self, request_id: str) -> bool:
        """Stop a request now, freeing its slot and pages; False if it is unknown or done."""
        req = self.requests.get(str(request_id))
        if req is None or req.status == "finished":
            return False
        if req.status == "waiting":
            self.waiting.remove(req)
        else:
            self._release(req)
        req.status, req.finish_reason = "finished", "cancelled"
        self.stats["cancelled"] += 1
        return True

    def forget(self, request_id: str) -> Request:
        """Drop a finished request from :attr:`requests` (a long-running server calls this once
        it has delivered the result); returns it."""
        req = self.requests[str(request_id)]
        if req.status != "finished":
            raise ValueError(f"request {request_id} has not finished")
        return self.requests.pop(str(request_id))

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    # ----- scheduling ----------------------------------------------------------------------
    def _running(self, group: int | None = None) -> list[Request]:
        return sorted((r for s, r in enumerate(self.slots) if r is not None and
                       (group is None or s % self.groups == group)), key=lambda r: r.admitted)

    def _pool(self, req: Request) -> PagePool:
        return self.pools[req.slot % self.groups]

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            req = self.waiting[0]
            first = len(req.prefix) if self.prefill_chunk is None else min(
                len(req.prefix), self.prefill_chunk)
            free = [s for s, r in enumerate(self.slots) if r is None]
            slot = max(free, key=lambda s: self.pools[s % self.groups].free)
            if -(-first // self.page_size) > self.pools[slot % self.groups].free:
                return  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            req.slot = slot
            self.slots[slot] = req
            req.status, req.cached, req.admitted = "prefilling", 0, next(self._admissions)

    def _release(self, req: Request) -> None:
        if req.slot is not None:
            self._pool(req).release(req.pages)
        req.pages = []
        if req.slot is not None:
            self.slots[req.slot] = None
            req.slot = None

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.status, req.cached = "waiting", 0
        req.preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(req)

    def _reserve(self, req: Request, positions: int) -> bool:
        """Pages for ``positions`` positions of ``req``, preempting the most recently admitted
        sequences while the pool is short; False if ``req`` itself had to go."""
        need = -(-positions // self.page_size) - len(req.pages)
        group, pool = req.slot % self.groups, self._pool(req)
        while need > pool.free:
            victim = self._running(group)[-1]
            self._preempt(victim)
            if victim is req:
                return False
        req.pages += pool.take(max(need, 0))
        used = sum(p.size - p.free for p in self.pools)
        self.stats["peak_pages"] = max(self.stats["peak_pages"], used)
        return True

    def _finish(self, req: Request, reason: str) -> None:
        req.status, req.finish_reason = "finished", reason
        self._release(req)
        self.stats["finished"] += 1

    def _record(self, req: Request, tokens: list[int], now: float, out: dict) -> None:
        """Deliver ``tokens`` to ``req``; finish it on a stop id or its budget."""
        req.generated += tokens
        req.token_times += [now] * len(tokens)
        self.stats["generated_tokens"] += len(tokens)
        entry = out.setdefault(req.request_id, RequestOutput(req.request_id, [], False, None))
        entry.new_token_ids += tokens
        last = req.generated[-1]
        if last in req.stop_ids or len(req.generated) >= req.max_tokens:
            self._finish(req, "eos" if last in req.stop_ids else "length")
            entry.finished, entry.finish_reason = True, req.finish_reason

    # ----- the step ------------------------------------------------------------------------
    def step(self, early: Callable[[list[RequestOutput]], None] | None = None
             ) -> list[RequestOutput]:
        """Admit, prefill (within the token budget), decode one burst; the outputs of every
        request that got tokens or finished. ``early``: called with the prefill's outputs (first
        tokens) before the decode burst runs, which are then not returned again — a server
        streams a first token without waiting a burst."""
        started = time.perf_counter()
        out: dict[str, RequestOutput] = {}
        self._admit()
        self._prefill_phase(out)
        if early is not None and out:
            early(list(out.values()))
            out = {}
        self._decode_phase(out)
        self._admit()  # freed slots take the next requests' first chunks at the next step
        self.stats["steps"] += 1
        self.busy_s += time.perf_counter() - started
        return list(out.values())

    def _knobs(self, reqs: list[Request]) -> tuple:
        keys = np.stack([np.asarray(jax.random.PRNGKey(r.seed)) for r in reqs])
        return (keys, np.array([len(r.generated) for r in reqs], np.int32),
                np.array([r.temperature for r in reqs], np.float32),
                np.array([r.top_k for r in reqs], np.int32),
                np.array([r.top_p for r in reqs], np.float32))

    def _table(self, reqs: list[Request | None], width: int) -> np.ndarray:
        table = np.zeros((len(reqs), width), np.int32)
        for b, r in enumerate(reqs):
            if r is not None:
                table[b, : len(r.pages)] = r.pages
        return table

    def _prefill_phase(self, out: dict) -> None:
        budget = self.prefill_chunk
        for req in [r for r in self._running() if r.status == "prefilling"]:
            if budget is not None and budget <= 0:
                break
            if req.status != "prefilling":  # preempted while an earlier one reserved pages
                continue
            prefix = req.prefix
            n = len(prefix) - req.cached
            if budget is not None:
                n = min(n, budget)
            if not self._reserve(req, req.cached + n):
                continue
            chunk = min(bucket(n, MIN_PREFILL_BUCKET), bucket_pow2(n, MIN_PREFILL_BUCKET))
            tokens = np.zeros((1, chunk), np.int32)
            tokens[0, :n] = prefix[req.cached: req.cached + n]
            width = bucket_pow2(-(-(req.cached + n) // self.page_size), self.min_width,
                                self.max_pages)
            token = self.runner.prefill(req.slot, tokens, self._table([req], width),
                                        np.array([req.cached], np.int32),
                                        np.array([n], np.int32), self._knobs([req]))
            req.cached += n
            self.stats["prefill_tokens"] += n
            if budget is not None:
                budget -= n
            if req.cached == len(prefix):
                req.status = "decoding"
                self._record(req, [int(np.asarray(token)[0])], time.perf_counter(), out)

    def _decode_phase(self, out: dict) -> None:
        rows = [r for r in self._running() if r.status == "decoding"]
        if not rows:
            return
        steps = self.decode_steps
        for req in rows:  # oldest first: the newest are preempted if the pool runs short
            if req.status == "decoding":
                self._reserve(req, req.cached + min(steps, req.max_tokens - len(req.generated)))
        slots = [r if r is not None and r.status == "decoding" else None for r in self.slots]
        live = [r for r in slots if r is not None]
        if not live:
            return
        width = bucket_pow2(max(len(r.pages) for r in live), self.min_width, self.max_pages)
        stop_width = bucket_pow2(max([len(r.stop_ids) for r in live] + [1]), MIN_STOP_WIDTH)
        rows_in = _decode_rows(slots, stop_width, self._knobs)
        tokens, ran = self.runner.decode(steps, rows_in, self._table(slots, width))
        now = time.perf_counter()
        self.stats["decode_bursts"] += 1
        self.stats["decode_steps"] += ran
        for b, req in enumerate(slots):
            if req is not None:
                req.cached += ran
                self._record(req, tokens[b, :ran].tolist(), now, out)

    # ----- convenience and metrics ---------------------------------------------------------
    def run(self, max_steps: int | None = None) -> None:
        """Step until every request has finished (or ``max_steps`` steps)."""
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_unfinished():
                return
            self.step()

    def result(self, request_id: str) -> GenerationResult:
        req = self.requests[str(request_id)]
        return GenerationResult(prompt_ids=req.prompt, generated_ids=list(req.generated),
                                finish_reason=req.finish_reason or "running")

    def metrics(self) -> dict:
        """Engine-wide counters: running/waiting, pages used, preemptions, tokens per second."""
        running = [r for r in self.slots if r is not None]
        gen = self.stats["generated_tokens"]
        return {"running": len(running), "waiting": len(self.waiting),
                "pages_used": sum(p.size - p.free for p in self.pools),
                "pages_total": sum(p.size for p in self.pools),
                "peak_pages_used": self.stats["peak_pages"],
                "page_size": self.page_size, "max_num_seqs": self.max_num_seqs,
                "preemptions": self.stats["preemptions"], "finished": self.stats["finished"],
                "cancelled": self.stats["cancelled"], "generated_tokens": gen,
                "prefill_tokens": self.stats["prefill_tokens"], "steps": self.stats["steps"],
                "decode_steps": self.stats["decode_steps"],
                "busy_s": round(self.busy_s, 4),
                "tokens_per_s": round(gen / self.busy_s, 2) if self.busy_s else None}


def _decode_rows(slots: list[Request | None], stop_width: int, knobs) -> tuple:
    """The per-slot host arrays of a decode burst (empty slots inactive)."""
    n = len(slots)
    tokens, lengths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    active, budget = np.zeros(n, bool), np.zeros(n, np.int32)
    stop = np.full((n, stop_width), -1, np.int32)
    for b, r in enumerate(slots):
        if r is not None:
            tokens[b], lengths[b], active[b], budget[b] = r.generated[-1], r.cached, True, r.max_tokens
            stop[b, : len(r.stop_ids)] = r.stop_ids
    placeholder = Request("", [0], 1)
    keys, n_gen, temperature, top_k, top_p = knobs([r or placeholder for r in slots])
    return tokens, lengths, active, n_gen, budget, stop, keys, temperature, top_k, top_p

