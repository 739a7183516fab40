"""``step3-jax serve``: an OpenAI-compatible HTTP server over the continuous-batching engine
(:mod:`step3_jax.serving`)."""

from __future__ import annotations

import argparse
import os

from step3_jax.cli import common

DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUED = 256
DEFAULT_DRAIN_S = 30.0
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "step3-jax", "xla")


def add_parser(sub) -> argparse.ArgumentParser:
    sv = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve the model over an OpenAI-compatible HTTP API (POST /v1/completions, "
                    "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics) on "
                    "the continuous-batching engine. Every program shape is compiled at "
                    "startup: /health answers 503 until then. SIGTERM or Ctrl-C drains the "
                    "requests in flight and exits 0.")
    common.model_args(sv)
    common.prefill_args(sv)
    common.engine_args(sv, None).add_argument(
        "--max-model-len", type=int, metavar="N",
        help="longest sequence served, prompt + generated (default: the model's context); a "
             "smaller one means fewer programs to compile and a smaller default pool")
    h = sv.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    h.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0: a free one, logged at startup)")
    h.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the "
                        "checkpoint directory's name, or the config's)")
    h.add_argument("--api-key", default=os.environ.get("STEP3_JAX_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: the "
                        "STEP3_JAX_API_KEY environment variable; unset: no key)")
    h.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED, metavar="N",
                   help="requests allowed to wait for a slot; past it the server answers 429 "
                        f"with Retry-After (default {DEFAULT_MAX_QUEUED})")
    h.add_argument("--chat-template", metavar="FILE|TEMPLATE",
                   help="a Jinja2 chat template (a file, or the template text) instead of the "
                        "checkpoint's tokenizer_config.json chat_template; without either, "
                        "/v1/chat/completions answers 400")
    h.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_S, metavar="S",
                   help="on SIGTERM/Ctrl-C, wait at most S seconds for requests in flight "
                        f"(default {DEFAULT_DRAIN_S:g})")
    h.add_argument("--access-log", action="store_true", help="log every HTTP request")
    h.add_argument("--compilation-cache", metavar="DIR|none",
                   default=os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE,
                   help="keep the compiled programs in DIR, so a restart with the same model "
                        "and flags skips most of the compiling (default: "
                        "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/step3-jax/xla; none: off)")
    common.afd_args(sv)
    sv.add_argument("-q", "--quiet", action="store_true",
                    help="only warnings and errors on stderr")
    return sv


def run(args) -> None:
    from step3_jax.serving.server import serve

    serve(args)
