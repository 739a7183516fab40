"""The HTTP layer: an OpenAI-compatible FastAPI app over an :class:`EngineLoop`.

It only translates: a request body becomes engine requests (one per prompt), the engine's
outputs become a response, or server-sent events (``data: {chunk}`` lines, then
``data: [DONE]``). Every error is the OpenAI shape (``protocol.ApiError``): 400 for a bad body
(types, values, a prompt past the context, malformed JSON), 401 for a wrong key, 404 for an
unknown model or route, 429 with ``Retry-After`` when the waiting queue is full, 503 while
compiling or after an engine failure. A client that goes away cancels its requests, which frees
their slots and pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from step3_jax.errors import Step3Error
from step3_jax.serving import protocol
from step3_jax.serving.chat import ChatTemplate, TemplateError
from step3_jax.serving.engine_loop import EngineFailed, EngineLoop, Overloaded
from step3_jax.serving.metrics import CONTENT_TYPE, ServerMetrics
from step3_jax.serving.protocol import ApiError, TextStream, bad

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions (chat: the context)
RETRY_AFTER_S = 1


@dataclasses.dataclass
class ServerState:
    """What the routes read; ``loop`` is None until the programs are compiled."""

    model_name: str
    vocab_size: int
    eos_ids: tuple[int, ...]
    max_model_len: int
    metrics: ServerMetrics
    tokenizer: object = None
    template: ChatTemplate | None = None
    api_key: str | None = None
    loop: EngineLoop | None = None
    status: str = "loading"  # loading | compiling | ok | failed
    info: dict = dataclasses.field(default_factory=dict)  # devices, placement, pool (/health)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def ready_loop(self) -> EngineLoop:
        if self.loop is not None and self.loop.failed is not None:
            raise ApiError(503, f"the engine failed ({self.loop.failed}); restart the server",
                           type="service_unavailable", code="engine_failed")
        if self.status != "ok" or self.loop is None:
            raise ApiError(503, f"the server is {self.status}; retry when /health answers 200",
                           type="service_unavailable", code="not_ready",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.loop


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    first = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", \
            None
    param = ".".join(loc) or None
    return f"{param or 'body'}: {first.get('msg', 'invalid')}", param


class _Choice:
    """One prompt's request inside a response: its engine id, tokens and text."""

    def __init__(self, index: int, prompt: list[int], stream: TextStream):
        self.index, self.prompt, self.text = index, prompt, stream
        self.rid: str | None = None
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.output = ""

    @property
    def done(self) -> bool:
        return self.finish is not None

    def take(self, out) -> tuple[str, list[int]]:
        """Fold in one engine output; ``(new text, new token ids)``."""
        new = list(out.new_token_ids)
        self.tokens += new
        delta = self.text.push(new, final=out.finished)
        if self.text.stopped:
            self.finish = "stop"
        elif out.finished:
            self.finish = protocol.finish_reason(out.finish_reason)
        self.output += delta
        return delta, new


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="step3-jax", description="OpenAI-compatible Step-3 server")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        message, param = _validation_message(e)
        return _error(bad(message, param))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code,
                                                                       "invalid_request_error")
        return _error(ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                               type="internal_server_error"))

    async def auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip(), state.api_key):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise ApiError(404, f"The model `{name}` does not exist (this server serves "
                                f"`{state.model_name}`)", param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        body = {"status": state.status, "model": state.model_name, **state.info}
        if state.loop is not None and state.loop.failed is not None:
            body = {**body, "status": "failed", "error": state.loop.failed}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "step3-jax", "max_model_len": state.max_model_len,
            "vocab_size": state.vocab_size}]}

    def encode(text: str, param: str, special: bool = True) -> list[int]:
        if state.tokenizer is None:
            raise bad(f"{param}: this model has no tokenizer (no tokenizer.json beside the "
                      "checkpoint); send token ids", param)
        return state.tokenizer.encode(text, add_special_tokens=special).ids

    def choices_for(body, prompts: list[list[int]], default_max: int | None):
        out = []
        for i, ids in enumerate(prompts):
            protocol.check_ids(ids, state.vocab_size, "prompt")
            knobs, stops = protocol.engine_knobs(
                body, prompt_len=len(ids), vocab_size=state.vocab_size, eos_ids=state.eos_ids,
                max_model_len=state.max_model_len, default_max_tokens=default_max,
                has_tokenizer=state.tokenizer is not None)
            out.append((_Choice(i, ids, TextStream(state.tokenizer, stops)), knobs))
        return out

    async def submit(loop: EngineLoop, choices) -> asyncio.Queue:
        """Queue every choice's request; one asyncio queue gets ``(choice, output)``."""
        events: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()
        submitted = []
        try:
            for choice, knobs in choices:
                sink = (lambda c: lambda out: aio.call_soon_threadsafe(
                    events.put_nowait, (c, out)))(choice)
                choice.rid = await asyncio.wrap_future(loop.submit(sink, choice.prompt, **knobs))
                submitted.append(choice)
        except Overloaded as e:
            _cancel(loop, submitted)
            raise ApiError(429, f"the server is overloaded: {e}; retry later",
                           type="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineFailed as e:
            _cancel(loop, submitted)
            raise ApiError(503, f"the engine cannot take requests: {e}",
                           type="service_unavailable", code="engine_failed") from None
        except Step3Error as e:
            _cancel(loop, submitted)
            raise bad(str(e)) from None
        return events

    def usage(choices) -> dict:
        prompt = sum(len(c.prompt) for c, _ in choices)
        completion = sum(len(c.tokens) for c, _ in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def next_event(loop: EngineLoop, events: asyncio.Queue):
        choice, out = await events.get()
        if isinstance(out, Exception):
            raise ApiError(503, f"the engine failed: {out}", type="service_unavailable",
                           code="engine_failed")
        return choice, out

    async def run(request: Request, body, choices, chat: bool):
        loop = state.ready_loop()
        events = await submit(loop, choices)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name}
        if body.stream:
            return StreamingResponse(_sse(loop, events, choices, head, body, chat),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, loop, choices))
        try:
            while not all(c.done for c, _ in choices):
                choice, out = await next_event(loop, events)
                if not choice.done:
                    choice.take(out)
                    if choice.text.stopped and not out.finished:  # a stop string matched
                        loop.cancel(choice.rid, "stop")
        finally:
            watcher.cancel()
            _cancel(loop, [c for c, _ in choices if not c.done])
        results = []
        for c, _ in choices:
            item = {"index": c.index, "logprobs": None, "finish_reason": c.finish}
            if chat:
                item["message"] = {"role": "assistant", "content": c.output}
            else:
                item["text"] = c.output
            if body.return_token_ids:
                item["token_ids"] = c.tokens
                if not chat:
                    item["prompt_token_ids"] = c.prompt
            results.append(item)
        response = {**head, "object": "chat.completion" if chat else "text_completion",
                    "choices": results, "usage": usage(choices)}
        if body.return_token_ids:
            prompts = [c.prompt for c, _ in choices]
            response["prompt_token_ids"] = prompts[0] if len(prompts) == 1 else prompts
        return response

    async def _sse(loop, events, choices, head, body, chat):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice, text, ids, finish) -> str:
            item = {"index": choice.index, "logprobs": None, "finish_reason": finish}
            if chat:
                item["delta"] = {"content": text} if text or finish is None else {}
            else:
                item["text"] = text
            if body.return_token_ids:
                item["token_ids"] = ids
            return _data({**head, "object": kind, "choices": [item]})

        try:
            if chat:
                for c, _ in choices:
                    yield _data({**head, "object": kind, "choices": [{
                        "index": c.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}]})
            while not all(c.done for c, _ in choices):
                try:
                    choice, out = await next_event(loop, events)
                except ApiError as e:
                    yield _data(e.body())
                    break
                if choice.done:
                    continue
                text, ids = choice.take(out)
                if choice.text.stopped and not out.finished:
                    loop.cancel(choice.rid, "stop")
                if text or ids or choice.done:
                    yield chunk(choice, text, ids, choice.finish)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _data({**head, "object": kind, "choices": [], "usage": usage(choices)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended
            _cancel(loop, [c for c, _ in choices if not c.done])

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: protocol.CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [encode(p, "prompt") if isinstance(p, str) else list(p)
                   for p in protocol.prompt_lists(body.prompt)]
        return await run(request, body, choices_for(body, prompts, DEFAULT_COMPLETION_TOKENS),
                         chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: protocol.ChatRequest, request: Request):
        check_model(body.model)
        if state.template is None:
            raise bad("this model has no chat template (no chat_template in "
                      "tokenizer_config.json beside the checkpoint); use /v1/completions, or "
                      "start the server with --chat-template FILE", "messages",
                      "no_chat_template")
        messages = [protocol.message_text(m, i) for i, m in enumerate(body.messages)]
        try:
            text = state.template.render(messages, body.add_generation_prompt)
        except TemplateError as e:
            raise bad(str(e), "messages") from None
        prompt = encode(text, "messages", special=False)  # the template writes BOS itself
        return await run(request, body, choices_for(body, [prompt], None), chat=True)

    return app


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _cancel(loop: EngineLoop, choices) -> None:
    for c in choices:
        if c.rid is not None:
            loop.cancel(c.rid)


async def _watch_disconnect(request: Request, loop: EngineLoop, choices) -> None:
    """A non-streaming request whose client disconnects: cancel its engine requests."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            _cancel(loop, [c for c, _ in choices if not c.done])
            for c, _ in choices:  # nobody will read the answer
                c.finish = c.finish or "cancelled"
            return
