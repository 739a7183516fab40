"""``step3-jax serve`` end to end: a real server process on loopback (the shipped demo model),
driven with the ``openai`` client and raw HTTP.

One server for most tests (module-scoped; under xdist each worker that runs a test here starts
its own, the second one compiling from the run's persistent cache), and a second, small one for
the overload, no-template and SIGTERM cases. Every wait is bounded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import threading
import time
import types

import httpx
import jinja2
import pytest

openai = pytest.importorskip("openai")

KEY = "sk-step3-jax-test"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ENGINE = ["--page-size", "16", "--max-num-seqs", "4"]
START_S = 420   # a cold start compiles six programs on a loaded 2-core machine
REQUEST_S = 120


class Server:
    """A ``step3-jax serve --port 0`` process; its URL is read from its startup log."""

    def __init__(self, *flags: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "step3_jax.cli", "serve",
                                      "--port", "0", *flags], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        self.log: list[str] = []  # stderr, read on a thread (a full pipe would block it)
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.url = None
        deadline = time.monotonic() + START_S
        while self.url is None and time.monotonic() < deadline:
            assert self.proc.poll() is None, "the server died:\n" + "".join(self.log)
            m = re.search(r" on (http://127\.0\.0\.1:\d+) ", "".join(self.log))
            self.url = m.group(1) if m else None
            time.sleep(0.1)
        assert self.url, "the server never logged its URL:\n" + "".join(self.log)
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the server died:\n" + "".join(self.log)
            if httpx.get(self.url + "/health", timeout=10).status_code == 200:
                return
            time.sleep(0.5)
        raise AssertionError("the server was not ready in time")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        time.sleep(0.2)  # the reader thread takes the last lines
        return code


class Shared:
    """The module's server, started on first use and again if a test stopped it
    (``test_sigterm_drains_and_exits_0``; xdist's work stealing does not keep file order)."""

    def __init__(self, *flags: str):
        self.flags, self.server = flags, None

    @property
    def current(self) -> Server:
        if self.server is None or self.server.proc.poll() is not None:
            self.server = Server(*self.flags)
        return self.server

    @property
    def url(self) -> str:
        return self.current.url

    @property
    def log(self) -> list[str]:
        return self.current.log


@pytest.fixture(scope="module")
def server():
    shared = Shared(*ENGINE, "--api-key", KEY, "--chat-template", TEMPLATE, "--max-queued", "64",
                    "--drain-timeout", "60")
    yield shared
    if shared.server is not None:
        shared.server.stop(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=REQUEST_S,
                         max_retries=0)


@pytest.fixture(scope="module")
def demo():
    """The demo model, its tokenizer and an engine like the server's (its programs come from
    the run's compilation cache)."""
    from step3_jax.checkpoint.loader import load, load_tokenizer
    from step3_jax.runtime.engine_setup import make_engine
    from step3_jax.training import demo as demo_model

    params, cfg = load(str(demo_model.directory()), None)
    engine = make_engine(params, cfg, max_num_seqs=4, page_size=16)
    return engine, cfg, load_tokenizer(demo_model.directory())


def expected(demo, prompts, max_tokens):
    from step3_jax.runtime.engine_setup import generate_requests

    engine, _, _ = demo
    results, _ = generate_requests(engine, prompts, max_new_tokens=max_tokens)
    return [r.generated_ids for r in results]


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=REQUEST_S,
                      headers={"Content-Type": "application/json", **headers}, **kw)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"step3_jax:{name}"):
            total += float(line.rsplit(" ", 1)[1])
    return total


PROMPTS = [[256, 100, 101, 102, 32], [256] + list(b"import os\n"), [256] + list(b"class A:\n  "),
           [256, 35, 32], [256] + list(b"for i in range(10):\n    print("),
           [256] + list(b"def __init__(self):")]


def test_health_turns_200_after_compiling_and_models_lists_the_model(server, client):
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["devices"] == 1
    assert health["page_size"] == 16 and health["max_num_seqs"] == 4
    models = client.models.list().data
    assert [m.id for m in models] == ["demo_model"]
    assert models[0].max_model_len == 256
    assert any("ready:" in line for line in server.log)


def test_concurrent_greedy_completions_give_the_engines_tokens(server, client, demo):
    want = expected(demo, PROMPTS, 24)

    def one(prompt):
        return client.completions.create(model="demo_model", prompt=prompt, max_tokens=24,
                                         temperature=0, extra_body={"return_token_ids": True})

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, PROMPTS))
    _, _, tok = demo
    for prompt, response, ids in zip(PROMPTS, got, want):
        choice = response.choices[0]
        assert choice.token_ids == ids
        assert response.prompt_token_ids == prompt
        assert choice.text == tok.decode(ids)
        assert choice.finish_reason == ("stop" if ids[-1] == 257 else "length")
        assert response.usage.prompt_tokens == len(prompt)
        assert response.usage.completion_tokens == len(ids)


def test_a_list_of_prompts_gives_one_choice_each(server, demo):
    r = post(server, "/v1/completions", {"prompt": PROMPTS[:3], "max_tokens": 8,
                                         "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["token_ids"] for c in body["choices"]] == expected(demo, PROMPTS[:3], 8)
    assert body["usage"]["prompt_tokens"] == sum(map(len, PROMPTS[:3]))


def test_streaming_gives_the_same_tokens_as_non_streaming(server, client):
    kw = dict(model="demo_model", prompt="def parse(text):\n", max_tokens=40, temperature=0.8,
              seed=7, extra_body={"return_token_ids": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
    assert ids == whole.choices[0].token_ids and text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(ids)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    # the raw stream: server-sent events, ending with [DONE]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=REQUEST_S,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "x = ", "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_through_the_template(server, client, demo):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "a loop"}]
    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        TEMPLATE).render(messages=messages, add_generation_prompt=True, bos_token="<|bos|>")
    _, _, tok = demo
    prompt = tok.encode(rendered, add_special_tokens=False).ids
    assert prompt[0] == 256  # the tokenizer's BOS, written by the template
    r = client.chat.completions.create(model="demo_model", messages=messages, max_tokens=12,
                                       temperature=0, extra_body={"return_token_ids": True})
    assert r.prompt_token_ids == prompt
    assert r.choices[0].token_ids == expected(demo, [prompt], 12)[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(r.choices[0].token_ids)
    stream = list(client.chat.completions.create(model="demo_model", messages=messages,
                                                 max_tokens=12, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == \
        r.choices[0].message.content


def test_a_stop_string_ends_the_text_before_it(server, client):
    full = client.completions.create(model="demo_model", prompt="import os\nimport sys\n",
                                     max_tokens=60, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert "\n" in full[1:]
    cut = full.index("\n", 1)
    for stream in (False, True):
        r = client.completions.create(model="demo_model", prompt="import os\nimport sys\n",
                                      max_tokens=60, temperature=0, stop=["\n"], stream=stream,
                                      extra_body={"ignore_eos": True})
        parts = list(r) if stream else [r]
        text = "".join(p.choices[0].text for p in parts if p.choices)
        assert text == full[:full.index("\n")]  # the text before the first stop
        assert parts[-1].choices[0].finish_reason == "stop"
    assert cut > 0


def test_seeded_sampling_repeats(client):
    kw = dict(model="demo_model", prompt="while ", max_tokens=16, temperature=1.0, top_p=0.9,
              seed=1234, extra_body={"top_k": 20, "return_token_ids": True})
    a, b = (client.completions.create(**kw).choices[0].token_ids for _ in range(2))
    assert a == b


BAD = [  # (body or raw text, status, param, what the message says)
    ({"prompt": [1, 2, 999]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "finite"),
    ('{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"prompt": [256] * 250, "max_tokens": 10}, 400, "max_tokens", "maximum context length"),
    ('{"prompt": "x", ', 400, None, "not valid JSON"),
    ({"prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"max_tokens": 3}, 400, "prompt", "required"),
    ({"prompt": "x", "stop": [300]}, 400, "stop", "outside the vocabulary"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body,status,param,says", BAD,
                         ids=[f"{b[1]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_answer_openai_errors_and_the_server_keeps_serving(server, body, status,
                                                                       param, says):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and says in error["message"], error
    ok = post(server, "/v1/completions", {"prompt": [256, 97], "max_tokens": 2})
    assert ok.status_code == 200


def test_the_api_key_is_required(server, client):
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong",
                      max_retries=0).models.list()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # no key needed
    r = httpx.get(server.url + "/v1/nothing", timeout=10,
                  headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_a_dropped_stream_frees_its_slot_and_pages(server):
    cancelled = metric(server, 'request_success_total{finish_reason="cancelled"')
    with httpx.stream("POST", server.url + "/v1/completions", timeout=REQUEST_S,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": [256, 97], "max_tokens": 250, "ignore_eos": True,
                            "stream": True, "temperature": 0}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(server, "num_requests_running") >= 1
    deadline = time.monotonic() + 60  # the server sees the disconnect at its next write
    while time.monotonic() < deadline:
        if metric(server, 'request_success_total{finish_reason="cancelled"') > cancelled:
            break
        time.sleep(0.2)
    assert metric(server, 'request_success_total{finish_reason="cancelled"') == cancelled + 1
    assert metric(server, "num_requests_running") == 0
    assert metric(server, "kv_cache_pages_used") == 0


def test_metrics_count_the_work(server, client):
    client.completions.create(model="demo_model", prompt="a", max_tokens=3, temperature=0)
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain")
    assert metric(server, "generation_tokens_total") >= 3
    assert metric(server, "time_to_first_token_seconds_count") >= 1
    assert metric(server, "kv_cache_pages_total") == 256 // 16 * 4


def test_serve_refuses_bad_flags_in_one_line(capsys):
    from conftest import run_cli

    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_cli(capsys, "serve", "-q", "--port", str(port))
    assert code == 2 and err == f"step3-jax: error: cannot listen on 127.0.0.1:{port}: " \
        "Address already in use (another server is using it; pick another --port, or 0 for a " \
        "free one)\n"
    for flags, says in ((["--max-model-len", "9999"], "--max-model-len must be in 1..256"),
                        (["--max-queued", "0"], "--max-queued must be >= 1"),
                        (["--chat-template", "/nonexistent.jinja"], "cannot read"),
                        (["--chat-template", "{% for %}"], "not a valid Jinja2 template"),
                        (["--page-size", "0"], "--page-size must be >= 1")):
        code, out, err = run_cli(capsys, "serve", "-q", "--port", "0", *flags)
        assert code == 2 and says in err and len(err.splitlines()) == 1, err


def test_health_and_requests_answer_503_while_compiling():
    from fastapi.testclient import TestClient

    from step3_jax.serving.app import ServerState, create_app
    from step3_jax.serving.metrics import ServerMetrics

    state = ServerState(model_name="m", vocab_size=258, eos_ids=(257,), max_model_len=256,
                        metrics=ServerMetrics("m"), status="compiling")
    with TestClient(create_app(state)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "compiling"
        r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "not_ready"


def test_loadtest_against_the_real_server(server, capsys):
    from conftest import run_cli

    code, out, err = run_cli(capsys, "loadtest", "--url", server.url, "--api-key", KEY,
                             "--concurrencies", "1,4", "--num-requests", "8",
                             "--prompt-lens", "8:40", "--output-lens", "12", "--sla-tpot",
                             "60000", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == "demo_model" and doc["devices"] == 1
    for level in doc["levels"]:
        assert level["completed"] == 8 and level["failed"] == 0
        assert level["output_tokens"] == 8 * 12  # ignore_eos: every budget in full
        assert level["met_sla"] is True
    assert doc["peak"]["load"]["concurrency"] == 4


def test_the_readme_quick_start_call(client):
    """The quick start's client call prints what the README shows (the same greedy request
    through the shared server)."""
    import ast
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    call = re.search(r'client\.completions\.create\(model="demo_model", prompt="def ", '
                     r'max_tokens=24, temperature=0\)\nprint\(repr\(r\.choices\[0\]\.text\)\)'
                     r'  # (.*)\n', readme)
    assert call, "the README's quick-start call is not where this test expects it"
    r = client.completions.create(model="demo_model", prompt="def ", max_tokens=24,
                                  temperature=0)
    assert r.choices[0].text == ast.literal_eval(call.group(1))


class SlowEngine:
    """An engine stand-in whose step holds its one running request until ``release`` is set:
    the queue's states, deterministically, without a model."""

    def __init__(self):
        self.waiting, self.running, self.requests = collections.deque(), [], {}
        self.release = threading.Event()

    def add_request(self, prompt, **knobs):
        rid = str(len(self.requests))
        self.requests[rid] = types.SimpleNamespace(request_id=rid, finish_reason=None)
        self.waiting.append(rid)
        return rid

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def step(self, early=None):
        from step3_jax.runtime.engine import RequestOutput

        if not self.running:
            self.running.append(self.waiting.popleft())
        self.release.wait(60)
        rid = self.running.pop()
        return [RequestOutput(rid, [65], True, "length")]

    def cancel(self, rid):
        return False

    def forget(self, rid):
        return self.requests.pop(rid)


def test_a_full_queue_answers_429_and_no_template_answers_400():
    from fastapi.testclient import TestClient

    from step3_jax.serving.app import ServerState, create_app
    from step3_jax.serving.engine_loop import EngineLoop
    from step3_jax.serving.metrics import ServerMetrics

    engine = SlowEngine()
    loop = EngineLoop(engine, max_queued=1)
    state = ServerState(model_name="m", vocab_size=258, eos_ids=(257,), max_model_len=256,
                        metrics=ServerMetrics("m"), status="ok", loop=loop)
    loop.start()
    body = {"prompt": [256, 97], "max_tokens": 4}
    try:
        with TestClient(create_app(state)) as c, \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                   "content": "hi"}]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
            first = pool.submit(c.post, "/v1/completions", json=body)  # runs, held
            deadline = time.monotonic() + 30
            while not engine.running and time.monotonic() < deadline:
                time.sleep(0.01)
            second = pool.submit(c.post, "/v1/completions", json=body)  # waits
            while loop.queued() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            third = c.post("/v1/completions", json=body)  # one already waits: refused
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            assert third.json()["error"]["code"] == "queue_full"
            engine.release.set()
            assert first.result(30).status_code == 200 and second.result(30).status_code == 200
            assert second.result().json()["usage"]["completion_tokens"] == 1
    finally:
        engine.release.set()
        loop.stop()


def test_sigterm_drains_and_exits_0(server):
    """SIGTERM with a request in flight refuses new connections, finishes the request and
    exits 0 (the next test that needs the server starts it again)."""
    server = server.current
    body = {"prompt": [256, 97], "max_tokens": 120, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    with httpx.Client(timeout=REQUEST_S, headers={"Authorization": f"Bearer {KEY}"}) as h, \
            h.stream("POST", server.url + "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not any("Shutting down" in x for x in server.log) and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=10)
        rest = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert sum(len(c["choices"][0]["token_ids"]) for c in rest if c["choices"]) >= 110
    assert server.stop(timeout=60) == 0
    assert any("stopped after" in x for x in server.log), "".join(server.log)
