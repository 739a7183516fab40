"""``step3-jax loadtest`` against a fake OpenAI-compatible server with known timing.

The fake (FastAPI + uvicorn in a background thread, on 127.0.0.1 only) streams a request's
tokens on an absolute schedule: token j is due ``first_s + j * step`` after the request
arrives, and a chunk leaves when its last token is due; every ``burst_every``-th chunk carries
two tokens. On that schedule the server-side TTFT is ``first_s`` and TPOT exactly ``step``
(scheduling jitter moves only the first and last arrivals, and TPOT divides it by the tokens);
a burst chunk's gap is two steps. ``step`` can grow with the requests in flight (a server that
slows under load), which makes an SLA break at a known concurrency. No JAX, no model.

Tolerances are for a loaded 2-core machine: the client and the server share the process, so an
event-loop stall of tens of milliseconds is possible; bounds are a few such stalls wide, and
never wide enough to accept a wrong definition (a TPOT computed per chunk instead of per token,
or ITL split into zero gaps, falls outside them).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from conftest import ROOT, run_cli
from step3_jax.serving import loadtest as lt
from step3_jax.serving import sweep

VOCAB, MAX_LEN, DEVICES, MODEL = 1000, 4096, 4, "fake-step3"


class Fake:
    """The fake server's behaviour, changed by each test (reset by the ``fake`` fixture)."""

    def reset(self):
        self.first_s, self.step_s, self.per_active_s = 0.05, 0.02, 0.0
        self.burst_every = 4
        self.reject_every = 0  # every n-th request is answered 429
        self.ready_at = 0.0  # time.monotonic() before which /health answers 503 compiling
        self.api_key = None
        self.active = self.count = 0
        self.bodies = []


def chunk_sizes(total: int, burst_every: int) -> list[int]:
    """Tokens per chunk as the fake sends them: every ``burst_every``-th chunk carries 2."""
    out = []
    while sum(out) < total:
        two = len(out) % burst_every == burst_every - 1 and total - sum(out) >= 2
        out.append(2 if two else 1)
    return out


def make_app(fake: Fake) -> FastAPI:
    app = FastAPI()

    def refused(request):
        if fake.api_key and request.headers.get("authorization") != f"Bearer {fake.api_key}":
            return JSONResponse({"error": {"message": "bad API key", "type": "auth",
                                           "param": None, "code": 401}}, status_code=401)
        return None

    @app.get("/health")
    async def health():
        if time.monotonic() < fake.ready_at:
            return JSONResponse({"status": "compiling"}, status_code=503)
        return {"status": "ok", "devices": DEVICES}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        return refused(request) or {"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "step3-jax",
             "max_model_len": MAX_LEN, "vocab_size": VOCAB}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        if (no := refused(request)) is not None:
            return no
        body = await request.json()
        fake.count += 1
        fake.bodies.append(body)
        if fake.reject_every and fake.count % fake.reject_every == 0:
            return JSONResponse({"error": {"message": "the queue is full", "type": "overloaded",
                                           "param": None, "code": 429}},
                                status_code=429, headers={"Retry-After": "1"})
        fake.active += 1
        step = fake.step_s + fake.per_active_s * fake.active
        total = body["max_tokens"]

        def event(choices, **extra):
            doc = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL,
                   "choices": choices, **extra}
            return f"data: {json.dumps(doc)}\n\n"

        async def events():
            try:
                t0, sent = time.monotonic(), 0
                for k in chunk_sizes(total, fake.burst_every):
                    due = t0 + fake.first_s + step * (sent + k - 1)
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    ids = [(7 * (sent + j)) % VOCAB for j in range(k)]
                    sent += k
                    yield event([{"index": 0, "text": "x" * k, "token_ids": ids, "logprobs": None,
                                  "finish_reason": "length" if sent == total else None}])
                yield event([], usage={"prompt_tokens": len(body["prompt"]),
                                       "completion_tokens": total,
                                       "total_tokens": len(body["prompt"]) + total})
                yield "data: [DONE]\n\n"
            finally:
                fake.active -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server():
    fake = Fake()
    fake.reset()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(make_app(fake), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):  # at most 10 s
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "the fake server did not start"
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield fake
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def fake(server):
    server.reset()
    yield server
    server.reset()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(fake, mix, **load):
    return asyncio.run(lt.run_level(fake.url, MODEL, mix, timeout=30, **load))


def test_measured_latencies_match_the_fakes_schedule(fake):
    mix = lt.request_mix(8, (4, 16), (6, 12), VOCAB, seed=3)
    results = _run(fake, mix, concurrency=4)
    s = lt.summarize(results, load=sweep.load(concurrency=4), devices=DEVICES)
    # what was asked: the contract's body, the mix's prompts and budgets
    assert sorted(map(json.dumps, fake.bodies)) == sorted(json.dumps(
        {"model": MODEL, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0,
         "stream": True, "ignore_eos": True, "return_token_ids": True,
         "stream_options": {"include_usage": True}}) for r in mix)
    assert all(r.ok for r in results), [r.error for r in results]
    # token counts exact; a 2-token chunk is one arrival, so one gap per chunk after the first
    for r, req in zip(results, mix):
        assert r.tokens == chunk_sizes(req.max_tokens, 4) and r.output_tokens == req.max_tokens
        assert len(r.itl) == len(r.tokens) - 1 and r.finish_reason == "length"
        # server side 50 ms: never less (upper bounds on the medians below: on a loaded 2-core
        # CI machine one request can stall for a few hundred ms, seen once at 420 ms)
        assert 0.045 <= r.ttft, r.ttft
        # 20 ms exactly on the server's schedule; per token, not per chunk (a per-chunk
        # figure would divide by the chunks, fewer than the tokens when a burst came)
        assert 0.015 <= r.tpot, r.tpot
        assert r.tpot == pytest.approx((r.arrivals[-1] - r.arrivals[0]) / (req.max_tokens - 1))
        assert 0.045 + 0.02 * (req.max_tokens - 1) - 0.005 <= r.e2e
    assert s["completed"] == 8 and s["failed"] == 0 and s["first_error"] is None
    assert s["output_tokens"] == sum(r.max_tokens for r in mix)
    assert s["prompt_tokens"] == sum(len(r.prompt) for r in mix)
    assert 15 <= s["tpot_ms_p50"] <= 80 and 45 <= s["ttft_ms_p50"] <= 500
    # gaps: single-token chunks ~20 ms, burst chunks ~40 ms
    single = [g for r in results for g, k in zip(r.itl, r.tokens[1:]) if k == 1]
    burst = [g for r in results for g, k in zip(r.itl, r.tokens[1:]) if k == 2]
    assert burst and 0.012 <= lt.percentile(single, 50) <= 0.08
    assert lt.percentile(burst, 50) >= 1.5 * lt.percentile(single, 50)
    assert s["itl_ms_p99"] >= 30 and s["e2e_ms_p90"] >= s["ttft_ms_p90"]
    assert s["output_tokens_per_s_per_device"] == pytest.approx(
        s["output_tokens_per_s"] / DEVICES, rel=1e-3)
    assert s["request_throughput_per_s"] == pytest.approx(8 / s["duration_s"], rel=1e-2)


def test_queue_full_answers_are_counted_as_failed_not_retried(fake):
    fake.reject_every, fake.first_s, fake.step_s = 3, 0.01, 0.005
    mix = lt.request_mix(9, (4, 4), (3, 3), VOCAB)
    s = lt.summarize(_run(fake, mix, concurrency=2), load=sweep.load(concurrency=2), devices=1)
    assert fake.count == 9  # no retry
    assert (s["completed"], s["failed"]) == (6, 3)
    assert s["failed_by_reason"] == {"HTTP 429": 3}
    assert s["first_error"] == "HTTP 429: the queue is full"
    assert s["output_tokens"] == 6 * 3


def test_poisson_arrivals_are_reproducible_from_the_seed(fake):
    a, b = lt.arrival_offsets(4000, 10.0, seed=1), lt.arrival_offsets(4000, 10.0, seed=1)
    assert a == b and a != lt.arrival_offsets(4000, 10.0, seed=2) and a[0] == 0.0
    gaps = [y - x for x, y in zip(a, a[1:])]
    # mean of 3999 exponential gaps: standard error 1.6%; 8% is 5 of them
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.08)
    assert lt.arrival_offsets(5, float("inf")) == [0.0] * 5
    # the same mix and arrivals twice; each request leaves at its scheduled time
    fake.first_s, fake.step_s = 0.005, 0.002
    mix = lt.request_mix(10, (4, 8), (2, 2), VOCAB, seed=5)
    assert mix == lt.request_mix(10, (4, 8), (2, 2), VOCAB, seed=5)
    offsets = lt.arrival_offsets(10, 40.0, seed=5)
    results = _run(fake, mix, request_rate=40.0, seed=5)
    for r, due in zip(results, offsets):
        assert r.ok and due - 0.002 <= r.send <= due + 0.5, (r.send, due)


def _cli(capsys, fake, *argv):
    return run_cli(capsys, "loadtest", "--url", fake.url, "--wait-ready", "5", *argv)


def test_the_sweep_stops_after_the_first_break_and_the_peak_excludes_it():
    """The sweep's logic on given summaries: the level that broke the SLA is the fastest, and
    the levels after it are never measured."""
    tpot = {1: 20.0, 2: 30.0, 4: 45.0, 8: 70.0, 16: 10.0}
    tok_s = {1: 100.0, 2: 180.0, 4: 150.0, 8: 400.0, 16: 999.0}
    measured = []

    def measure(point):
        c = point["concurrency"]
        measured.append(c)
        return {"load": point, "output_tokens_per_s": tok_s[c],
                "output_tokens_per_s_per_device": tok_s[c] / 4, "tpot_ms_p90": tpot[c]}

    out = sweep.sweep([sweep.load(concurrency=c) for c in tpot], measure, sla_tpot_ms=50)
    assert measured == [1, 2, 4, 8]
    assert [s["met_sla"] for s in out["levels"]] == [True, True, True, False]
    assert out["peak"] == {"load": {"request_rate": None, "concurrency": 2},
                           "output_tokens_per_s": 180.0, "output_tokens_per_s_per_device": 45.0,
                           "tpot_ms_p90": 30.0}
    assert out["message"] == ("peak meeting the SLA (TPOT p90 <= 50 ms): 180.0 output tokens/s "
                              "(45.0 per device) at 2 clients")
    measured.clear()
    out = sweep.sweep([sweep.load(concurrency=c) for c in (1, 2)], measure, sla_tpot_ms=50)
    assert out["peak"]["load"]["concurrency"] == 2 and "every level met it" in out["message"]
    out = sweep.sweep([sweep.load(concurrency=8)], measure, sla_tpot_ms=50)
    assert out["peak"] is None and out["message"] == ("no level met the SLA (TPOT p90 <= 50 "
                                                      "ms): the first, 8 clients, had 70 ms")


def test_the_sla_sweep_against_a_server_that_slows_under_load(capsys, fake):
    # TPOT = 20 ms + 5 ms per request in flight: 1, 2, 4 clients stay at or under 45 ms (at
    # most 5 in flight, with a request of the last level still closing), 8 clients reach 60 ms
    # in the steady state (p90 of 16 requests: 60 ms); 16 is never run. Output tokens/s,
    # roughly 43, 70, 107 at 1, 2, 4 clients (and ~145 at 8), so the peak is at 4.
    fake.first_s, fake.step_s, fake.per_active_s, fake.burst_every = 0.02, 0.02, 0.005, 99
    code, out, err = _cli(capsys, fake, "--concurrencies", "1,2,4,8,16", "--sla-tpot", "50",
                          "--num-requests", "16", "--prompt-lens", "8", "--output-lens", "8",
                          "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert [s["load"]["concurrency"] for s in doc["levels"]] == [1, 2, 4, 8]
    assert [s["met_sla"] for s in doc["levels"]] == [True, True, True, False]
    assert doc["levels"][3]["tpot_ms_p90"] > 50 >= doc["levels"][2]["tpot_ms_p90"]
    best = doc["levels"][2]
    assert best["output_tokens_per_s"] > max(s["output_tokens_per_s"] for s in doc["levels"][:2])
    assert doc["peak"] == {"load": best["load"],
                           "output_tokens_per_s": best["output_tokens_per_s"],
                           "output_tokens_per_s_per_device":
                               best["output_tokens_per_s_per_device"],
                           "tpot_ms_p90": best["tpot_ms_p90"]}
    assert doc["sla"] == {"tpot_ms": 50.0, "percentile": 90.0} and doc["devices"] == DEVICES
    assert doc["message"].startswith("peak meeting the SLA (TPOT p90 <= 50 ms)")
    assert all(s["output_tokens"] == 16 * 8 and s["failed"] == 0 for s in doc["levels"])


def test_no_level_meeting_the_sla_is_a_null_peak_and_a_message(capsys, fake):
    fake.first_s, fake.step_s, fake.burst_every = 0.01, 0.02, 99
    code, out, err = _cli(capsys, fake, "--request-rates", "50,inf", "--sla-tpot", "5",
                          "--sla-percentile", "50", "--num-requests", "3", "--prompt-lens",
                          "4", "--output-lens", "3", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["levels"]) == 1 and doc["levels"][0]["met_sla"] is False
    assert doc["peak"] is None
    assert doc["message"].startswith("no level met the SLA (TPOT p50 <= 5 ms): the first, "
                                     "50 req/s, had ")


def test_json_markdown_and_plots(capsys, fake, tmp_path):
    fake.first_s, fake.step_s = 0.01, 0.004
    args = ("--concurrencies", "1,2", "--sla-tpot", "1000", "--num-requests", "4",
            "--prompt-lens", "4:8", "--output-lens", "4", "--devices", "2")
    code, out, err = _cli(capsys, fake, *args, "--label", "colocated", "--json",
                          "--plot", str(tmp_path / "one.png"))
    assert code == 0, err
    assert out.count("\n") == 1  # exactly one JSON document, on one line
    doc = json.loads(out)
    assert doc["label"] == "colocated" and doc["devices"] == 2 and len(doc["levels"]) == 2
    assert doc["mode"] == "concurrency" and doc["plot"] == str(tmp_path / "one.png")
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote " in err and "peak meeting the SLA" in err
    (tmp_path / "colocated.json").write_text(out)

    code, out, err = _cli(capsys, fake, *args, "--label", "afd", "--plot",
                          str(tmp_path / "two.png"), "--compare", str(tmp_path / "colocated.json"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"afd: {MODEL} at {fake.url}, 4 requests per level")
    header = lines[2]
    assert header.startswith("| level | done/failed | req/s | out tok/s | tok/s/device |")
    assert header.endswith("| ITL p99 ms | e2e p90 ms | met SLA |")
    rows = [line for line in lines[4:] if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| 1 client", "| 2 clients"]
    assert all(r.endswith("| yes |") and r.count("|") == header.count("|") for r in rows)
    assert lines[-1].startswith("peak meeting the SLA (TPOT p90 <= 1000 ms)")
    assert (tmp_path / "two.png").stat().st_size > 10_000


def test_one_run_without_an_sla_and_waiting_for_compilation(capsys, fake):
    fake.first_s, fake.step_s = 0.01, 0.004
    fake.ready_at = time.monotonic() + 0.8
    code, out, err = _cli(capsys, fake, "--request-rate", "100", "--num-requests", "3",
                          "--prompt-lens", "4", "--output-lens", "2", "--json")
    assert code == 0, err
    assert "waiting for" in err and "(compiling)" in err
    doc = json.loads(out)
    assert doc["sla"] is None and doc["peak"] is None and doc["message"] is None
    (level,) = doc["levels"]
    assert level["load"] == {"request_rate": 100.0, "concurrency": None}
    assert level["met_sla"] is None and level["completed"] == 3 and level["devices"] == DEVICES


def _one_line_error(code, out, err, culprit):
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()  # log lines (waiting for the server) may come first
    errors = [line for line in lines if line.startswith("step3-jax: error: ")]
    assert errors == lines[-1:], err
    assert culprit in errors[0], errors[0]


@pytest.mark.parametrize("argv, culprit", [
    (["--url", "ftp://example.com"], "--url"),
    (["--url", "not a url"], "--url"),
    (["--url", "http://127.0.0.1:99999"], "port 99999"),
    (["--prompt-lens", "9:2"], "--prompt-lens"),
    (["--output-lens", "0"], "--output-lens"),
    (["--request-rate", "0"], "--request-rate"),
    (["--request-rate", "nan"], "--request-rate"),
    (["--request-rate", "2", "--concurrency", "3"], "not allowed with argument"),
    (["--concurrencies", "4,2"], "increasing order"),
    (["--request-rates", "1,x"], "--request-rates"),
    (["--num-requests", "0"], "--num-requests"),
    (["--sla-tpot", "-5"], "--sla-tpot"),
    (["--sla-percentile", "0"], "--sla-percentile"),
    (["--timeout", "0"], "--timeout"),
    (["--compare", "x.json"], "--compare goes with --plot"),
])
def test_bad_flags_are_one_line_errors(capsys, argv, culprit):
    _one_line_error(*run_cli(capsys, "loadtest", *argv), culprit)


def test_server_side_errors_are_one_line_errors(capsys, fake, tmp_path, monkeypatch):
    port = _free_port()  # nothing listens there
    _one_line_error(*run_cli(capsys, "loadtest", "--url", f"http://127.0.0.1:{port}",
                             "--wait-ready", "0.3"), "cannot reach the server")
    fake.ready_at = time.monotonic() + 60
    _one_line_error(*_cli(capsys, fake, "--wait-ready", "0.3"), "not ready after --wait-ready")
    fake.ready_at = 0.0
    _one_line_error(*_cli(capsys, fake, "--model", "other"), "--model 'other'")
    _one_line_error(*_cli(capsys, fake, "--prompt-lens", "4000", "--output-lens", "100"),
                    "max_model_len 4096")
    fake.api_key = "secret"
    _one_line_error(*_cli(capsys, fake, "--api-key", "wrong"), "HTTP 401: bad API key")
    (tmp_path / "bad.json").write_text('{"levels": 3}')
    _one_line_error(*_cli(capsys, fake, "--plot", str(tmp_path / "p.png"), "--compare",
                          str(tmp_path / "bad.json")), "not a `step3-jax loadtest --json`")
    fake.api_key = None
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    _one_line_error(*_cli(capsys, fake, "--num-requests", "1", "--prompt-lens", "4",
                          "--output-lens", "2", "--plot", str(tmp_path / "p.png")),
                    "--plot needs matplotlib")
    assert fake.count == 1  # only the last run sent a request


def test_loadtest_never_imports_jax(fake):
    """The console path end to end in a fresh interpreter: the run, and no JAX imported."""
    code = ("import sys; from step3_jax.cli import app; "
            f"rc = app.main(['loadtest', '--url', '{fake.url}', '--num-requests', '2', "
            "'--prompt-lens', '4', '--output-lens', '2', '--json', '-q']); "
            "assert 'jax' not in sys.modules, 'jax imported'; sys.exit(rc)")
    fake.first_s, fake.step_s = 0.005, 0.002
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["levels"][0]["output_tokens"] == 4
