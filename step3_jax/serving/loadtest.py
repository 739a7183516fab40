"""The load generator behind ``step3-jax loadtest``: a seeded request mix sent to an
OpenAI-compatible server (``POST /v1/completions``, streamed as server-sent events) at Poisson
arrivals or at a fixed concurrency, and the serving metrics (``spec/serving.md``) measured on the
client.

Per request, with ``time.perf_counter``: the send (just before the request is written), then the
arrival of each chunk that carries tokens, its tokens counted by ``len(token_ids)``. A chunk
carrying k tokens (the server decodes in bursts) is *one* arrival: it ends one inter-token gap
and adds no zero gaps, so ITL is the gaps between token-carrying chunks (a burst shows as one
longer gap), while TPOT = (e2e - TTFT) / (output tokens - 1) spreads it over its tokens. TTFT:
send -> the first token-carrying chunk; e2e: send -> the last one.

No JAX: loadtest starts fast and never touches a device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import time

import httpx
import numpy as np

from step3_jax.errors import Step3Error

log = logging.getLogger("step3_jax")

HEALTH, MODELS, COMPLETIONS = "/health", "/v1/models", "/v1/completions"
CONNECT_GRACE_S = 10.0  # a server just started may not listen yet; past this, unreachable
PERCENTILES = (50, 90, 99)


# --- the server -------------------------------------------------------------------------------

def base_url(text: str) -> str:
    """``--url``: ``http(s)://HOST[:PORT][/PREFIX]`` without a trailing ``/v1`` (an OpenAI base
    URL names the same server), or a one-line error."""
    try:
        url = httpx.URL(text)
        host, scheme = url.host, url.scheme
        port = url.port  # parses the port (httpx checks its range)
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise Step3Error(f"--url {text!r}: not a URL ({e})") from None
    if port is not None and not 1 <= port <= 65535:
        raise Step3Error(f"--url {text!r}: port {port} is not in 1-65535")
    if scheme not in ("http", "https") or not host:
        raise Step3Error(f"--url {text!r}: expected http://HOST:PORT (the server's address)")
    path = url.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}{'' if port is None else f':{port}'}{path}"


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(body: bytes | str) -> str:
    """The message of an OpenAI error body (``{"error": {"message": ...}}``), else its text."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        doc = json.loads(text)
        err = doc.get("error") if isinstance(doc, dict) else None
        message = err.get("message") if isinstance(err, dict) else err
        if message:
            return " ".join(str(message).split())[:300]
    except ValueError:
        pass
    return " ".join(text.split())[:300] or "(empty body)"


def _json(resp: httpx.Response, what: str) -> dict:
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise Step3Error(f"{what} did not answer a JSON object: {resp.text[:120]!r}")
    return doc


def wait_ready(url: str, wait_s: float, api_key: str | None = None,
               poll_s: float = 0.5) -> dict:
    """Poll ``GET /health`` until it answers 200 (its JSON, e.g. ``devices``), for at most
    ``wait_s`` seconds while it answers 503 (compiling, loading) and at most
    ``min(wait_s, CONNECT_GRACE_S)`` while nothing answers; a one-line error past either."""
    now = time.monotonic()
    deadline, grace = now + wait_s, now + min(wait_s, CONNECT_GRACE_S)
    said = None
    with httpx.Client(headers=_headers(api_key), trust_env=False) as client:
        for _ in range(int(wait_s / poll_s) + 2):  # bounded; the deadline ends it first
            try:
                resp = client.get(url + HEALTH, timeout=max(0.1, min(10.0, wait_s)))
            except httpx.HTTPError as e:
                if time.monotonic() >= grace:
                    why = str(e)[:120] or "no answer"
                    raise Step3Error(f"--url {url}: cannot reach the server "
                                     f"({type(e).__name__}: {why})") from None
                state = "not answering"
            else:
                if resp.status_code == 200:
                    return _json(resp, f"{url}{HEALTH}")
                if resp.status_code != 503:
                    raise Step3Error(f"{url}{HEALTH} answered HTTP {resp.status_code}: "
                                     f"{error_message(resp.content)}")
                try:
                    state = str(resp.json().get("status") or "503")
                except (ValueError, AttributeError):
                    state = "503"
            if state != said:
                log.info("waiting for %s to be ready (%s)", url, state)
                said = state
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(poll_s, left))
    raise Step3Error(f"the server at {url} was not ready after --wait-ready {wait_s:g} s "
                     f"(last: {said})")


def served_model(url: str, name: str | None, api_key: str | None = None) -> dict:
    """The ``GET /v1/models`` entry of ``name`` (default: the first served model); it must give
    ``vocab_size`` (prompts are random token ids below it)."""
    try:
        with httpx.Client(headers=_headers(api_key), trust_env=False, timeout=30.0) as client:
            resp = client.get(url + MODELS)
    except httpx.HTTPError as e:
        raise Step3Error(f"{url}{MODELS}: {type(e).__name__}: {str(e)[:120]}") from None
    if resp.status_code != 200:
        raise Step3Error(f"{url}{MODELS} answered HTTP {resp.status_code}: "
                         f"{error_message(resp.content)}")
    data = _json(resp, f"{url}{MODELS}").get("data")
    models = [m for m in (data if isinstance(data, list) else []) if isinstance(m, dict)
              and "id" in m]
    if not models:
        raise Step3Error(f"{url}{MODELS} lists no model")
    entry = models[0] if name is None else next((m for m in models if m["id"] == name), None)
    if entry is None:
        raise Step3Error(f"--model {name!r}: the server serves "
                         f"{', '.join(repr(m['id']) for m in models)}")
    if not isinstance(entry.get("vocab_size"), int) or entry["vocab_size"] < 1:
        raise Step3Error(f"{url}{MODELS}: model {entry['id']!r} gives no vocab_size (the random "
                         "prompts are token ids below it)")
    return entry


# --- the request mix and the arrivals ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def request_mix(n: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int],
                vocab_size: int, seed: int = 0) -> list[Request]:
    """``n`` requests, seeded: prompt lengths uniform in ``prompt_lens`` and output budgets in
    ``output_lens`` (both inclusive), prompts random token ids in ``[0, vocab_size)``."""
    rng = random.Random(seed)
    ids = range(vocab_size)
    out = []
    for _ in range(n):
        length, budget = rng.randint(*prompt_lens), rng.randint(*output_lens)
        out.append(Request(rng.choices(ids, k=length), budget))
    return out


def arrival_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the run's start: a Poisson process at ``rate`` requests per
    second (exponential gaps from their own seeded stream, the first request at 0); ``inf``: all
    at 0."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals:{seed}")
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# --- one request ------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """One request's measurements, in seconds from the run's start."""

    index: int
    prompt_tokens: int
    max_tokens: int
    send: float = 0.0
    end: float = 0.0  # the stream's end ([DONE]) or the failure
    arrivals: list[float] = dataclasses.field(default_factory=list)  # token-carrying chunks
    tokens: list[int] = dataclasses.field(default_factory=list)  # tokens in each of them
    finish_reason: str | None = None
    error: str | None = None  # None: completed
    reason: str | None = None  # the failure's kind: "HTTP 429", "timeout", "connection", "stream"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.send if self.arrivals else None

    @property
    def e2e(self) -> float | None:
        return self.arrivals[-1] - self.send if self.arrivals else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None


class _BadStream(Exception):
    pass


async def _read_stream(resp: httpx.Response, result: Result, start: float) -> None:
    done, usage = False, None
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):  # blank separators, comments, other SSE fields
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        now = time.perf_counter() - start
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _BadStream(f"a chunk is not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise _BadStream(f"a chunk is not a JSON object: {data[:80]!r}")
        if "error" in chunk:
            raise _BadStream(error_message(data))
        count = 0
        for choice in chunk.get("choices") or []:
            ids = choice.get("token_ids")
            if ids is None and choice.get("text"):
                raise _BadStream("a chunk has text but no token_ids (the server must honour "
                                 "return_token_ids)")
            count += len(ids or ())
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
        if count:
            result.arrivals.append(now)
            result.tokens.append(count)
        usage = chunk.get("usage") or usage
    if not done:
        raise _BadStream("the stream ended before data: [DONE]")
    if usage is not None and usage.get("completion_tokens") != result.output_tokens:
        raise _BadStream(f"usage says {usage.get('completion_tokens')} completion tokens, the "
                         f"chunks carried {result.output_tokens}")


async def send(client: httpx.AsyncClient, url: str, model: str, request: Request,
               result: Result, start: float, timeout: float) -> None:
    """One streamed completion into ``result``; every failure is recorded there, none raised."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    result.send = time.perf_counter() - start
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + COMPLETIONS, json=body) as resp:
                if resp.status_code != 200:
                    result.reason = f"HTTP {resp.status_code}"
                    result.error = f"HTTP {resp.status_code}: {error_message(await resp.aread())}"
                    return
                await _read_stream(resp, result, start)
    except TimeoutError:
        result.reason, result.error = "timeout", f"no complete answer within {timeout:g} s"
    except httpx.HTTPError as e:
        result.reason = "connection"
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    except _BadStream as e:
        result.reason, result.error = "stream", str(e)
    finally:
        result.end = time.perf_counter() - start


async def run_level(url: str, model: str, mix: list[Request], *, request_rate: float | None = None,
                    concurrency: int | None = None, seed: int = 0, api_key: str | None = None,
                    timeout: float = 600.0, progress=None) -> list[Result]:
    """Send ``mix`` at Poisson arrivals of ``request_rate`` per second (``inf``: all at once) or
    from ``concurrency`` clients each sending its next request when its last one ends."""
    if (request_rate is None) == (concurrency is None):
        raise ValueError("give request_rate or concurrency")
    results = [Result(i, len(r.prompt), r.max_tokens) for i, r in enumerate(mix)]
    limits = httpx.Limits(max_connections=concurrency,  # None: unbounded
                          max_keepalive_connections=concurrency)
    # trust_env=False: connect directly (a proxy from the environment would be measured too)
    async with httpx.AsyncClient(headers=_headers(api_key), timeout=httpx.Timeout(timeout),
                                 limits=limits, trust_env=False) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            await send(client, url, model, mix[i], results[i], start, timeout)
            if progress is not None:
                progress.update(1)

        if concurrency:
            queue = iter(range(len(mix)))  # shared: each client takes the next request

            async def client_loop() -> None:
                for i in queue:
                    await one(i)

            await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(mix)))))
        else:
            tasks = []
            for i, offset in enumerate(arrival_offsets(len(mix), request_rate, seed)):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
    return results


# --- the summary ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (NumPy's, linear between the closest ranks); None if empty."""
    return float(np.percentile(values, q)) if values else None


def pkey(metric: str, q: float) -> str:
    """``ttft_ms_p90``, ``tpot_ms_p99.9``: a summary key."""
    return f"{metric}_ms_p{q:g}"


def _latency(metric: str, seconds: list[float], qs) -> dict:
    ms = lambda v: None if v is None else round(1e3 * v, 3)  # noqa: E731
    out = {f"{metric}_ms_mean": ms(sum(seconds) / len(seconds) if seconds else None)}
    out.update({pkey(metric, q): ms(percentile(seconds, q)) for q in qs})
    return out


def summarize(results: list[Result], *, load: dict, devices: int | None,
              percentiles=PERCENTILES) -> dict:
    """One run's summary: counts, throughput over the run (first send to last finish, failures
    included), and mean and percentiles (ms) of TTFT, TPOT (requests with 2+ tokens), ITL (every
    gap of every completed request) and e2e."""
    done = [r for r in results if r.ok]
    failed = sorted((r for r in results if not r.ok), key=lambda r: r.index)
    duration = (max(r.end for r in results) - min(r.send for r in results)) if results else 0.0
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    rate = lambda x: round(x / duration, 3) if duration > 0 else None  # noqa: E731
    reasons: dict[str, int] = {}
    for r in failed:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    out = {"load": load, "requests": len(results), "completed": len(done),
           "failed": len(failed), "failed_by_reason": reasons,
           "first_error": failed[0].error if failed else None,
           "duration_s": round(duration, 3), "prompt_tokens": in_tokens,
           "output_tokens": out_tokens, "request_throughput_per_s": rate(len(done)),
           "output_tokens_per_s": rate(out_tokens),
           "total_tokens_per_s": rate(in_tokens + out_tokens), "devices": devices,
           "output_tokens_per_s_per_device": (rate(out_tokens / devices)
                                              if devices and duration > 0 else None)}
    qs = sorted(set(percentiles))
    out |= _latency("ttft", [r.ttft for r in done if r.ttft is not None], qs)
    out |= _latency("tpot", [r.tpot for r in done if r.tpot is not None], qs)
    out |= _latency("itl", [g for r in done for g in r.itl], qs)
    out |= _latency("e2e", [r.e2e for r in done if r.e2e is not None], qs)
    return out
