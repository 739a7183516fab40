"""The OpenAI-compatible request bodies, their checks, and the text side of the responses.

Request bodies are pydantic models (FastAPI validates their types; a wrong type answers 400,
see ``app.py``); :func:`engine_knobs` checks the values against the model and turns a body into
the engine's request arguments, raising :class:`ApiError` with the OpenAI error shape and the
offending ``param``. :class:`TextStream` turns a request's tokens into text as they arrive,
with stop strings: text is held back while it could still be the start of a stop string (or an
incomplete UTF-8 character), and a match ends the choice with the text before it.

Extensions, as vLLM spells them: ``top_k`` (0 or -1: off), ``ignore_eos``, ``stop_token_ids``
(token ids may also be given in ``stop``), ``return_token_ids`` (``token_ids`` on each choice,
``prompt_token_ids`` on the response).
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type,
                                                                      param, code)
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as vLLM does

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    top_logprobs: int | None = None


def prompt_lists(prompt) -> list:
    """A completion's ``prompt`` as a list of prompts (each text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    if not prompt:
        raise bad("prompt is empty", "prompt")
    return list(prompt)


def check_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if not ids:
        raise bad(f"{param} is empty", param)
    bad_id = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad_id is not None:
        raise bad(f"token id {bad_id} in {param} is outside the vocabulary "
                  f"(0..{vocab_size - 1})", param)


def message_text(message: ChatMessage, i: int) -> dict:
    """A chat message as the template sees it (``content`` a string; text parts joined)."""
    content = message.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts are supported, got "
                          f"{part.get('type')!r}", f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    return {"role": message.role, "content": content or ""}


def engine_knobs(body: _Sampling, *, prompt_len: int, vocab_size: int, eos_ids: tuple[int, ...],
                 max_model_len: int, default_max_tokens: int | None, has_tokenizer: bool
                 ) -> tuple[dict, list[str]]:
    """``(Engine.add_request keyword arguments, stop strings)`` for one prompt of
    ``prompt_len`` tokens, or :class:`ApiError` naming the field at fault."""
    if body.n != 1:
        raise bad(f"n must be 1 (one choice per prompt), got {body.n}", "n")
    if body.best_of not in (None, 1):
        raise bad("best_of is not supported", "best_of")
    if body.logprobs not in (None, False, 0) or getattr(body, "top_logprobs", None):
        raise bad("logprobs are not supported", "logprobs")
    if getattr(body, "echo", False):
        raise bad("echo is not supported", "echo")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0:
            raise bad(f"{name} is not supported (only 0)", name)
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else \
        "max_tokens"
    room = max_model_len - prompt_len + 1  # the last token is never fed back
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    if max_tokens < 1:
        raise bad(f"{param} must be >= 1, got {max_tokens}", param)
    if prompt_len + max_tokens - 1 > max_model_len:
        raise bad(f"This model's maximum context length is {max_model_len} tokens. However, "
                  f"you requested {prompt_len + max_tokens - 1} tokens ({prompt_len} in the "
                  f"prompt, {max_tokens} to generate, less the last, which is never fed "
                  "back). Please reduce the prompt or max_tokens.", param,
                  "context_length_exceeded")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise bad(f"temperature must be a finite number >= 0, got {temperature}", "temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise bad(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    if top_k < 0:
        raise bad(f"top_k must be >= 0 (0 or -1: off), got {body.top_k}", "top_k")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    strings = [s for s in stop if isinstance(s, str)]
    if any(not s for s in strings):
        raise bad("stop strings must not be empty", "stop")
    if strings and not has_tokenizer:
        raise bad("stop strings need a tokenizer and this model has none; give token ids in "
                  "stop or stop_token_ids", "stop")
    stop_ids = [s for s in stop if isinstance(s, int)] + list(body.stop_token_ids or [])
    for t in stop_ids:
        if not 0 <= t < vocab_size:
            raise bad(f"stop token id {t} is outside the vocabulary (0..{vocab_size - 1})",
                      "stop_token_ids" if t in (body.stop_token_ids or []) else "stop")
    ids = ([] if body.ignore_eos else list(eos_ids)) + stop_ids
    seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    return (dict(max_tokens=int(max_tokens), temperature=float(temperature), top_k=int(top_k),
                 top_p=float(top_p), seed=int(seed), stop_ids=list(dict.fromkeys(ids))),
            strings)


FinishReason = Literal["stop", "length"]


def finish_reason(engine_reason: str | None) -> str | None:
    """The engine's reason as OpenAI spells it: a stop id -> ``stop``, the budget ->
    ``length``."""
    return {"eos": "stop", "length": "length"}.get(engine_reason or "", engine_reason)


class TextStream:
    """One choice's tokens turned into text as they arrive; see the module docstring.
    ``tokenizer`` None: the text stays empty (clients read ``token_ids``)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0          # characters already emitted
        self.stopped = False   # a stop string matched

    def text(self) -> str:
        return self.tokenizer.decode(self.ids) if self.tokenizer is not None else ""

    def push(self, ids: list[int], final: bool) -> str:
        """Add tokens; the text that is now safe to emit (everything at ``final``)."""
        self.ids += ids
        text = self.text()
        end = len(text)
        if self.stops:
            hits = [i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stops)
                    if i >= 0]
            if hits:
                self.stopped, end = True, min(hits)
        if not (self.stopped or final):
            end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character waits
            end = max(self.sent, end - self.hold)
        delta = text[self.sent: end]
        self.sent = max(self.sent, end)
        return delta
