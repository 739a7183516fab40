"""``step3-jax serve``: load, listen, compile, serve, drain.

1. Everything the flags name is checked and the port is bound before any weight loads (a bad
   flag, a busy port or a model that cannot fit fails in one line).
2. The weights load and the engine's page pool is allocated.
3. The server listens at once; ``/health`` answers 503 ``{"status": "compiling"}`` while every
   program shape the engine can ask for is compiled (:func:`engine_setup.compile_programs`),
   then 200, and the engine thread starts taking requests.
4. SIGTERM or Ctrl-C: the socket closes (no new connections), requests in flight finish (for at
   most ``--drain-timeout`` seconds; then they are cancelled), the engine stops, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time

from step3_jax.errors import Step3Error
from step3_jax.model.config import DEFAULT_MAX_NUM_SEQS

log = logging.getLogger("step3_jax")


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (``port`` 0: a free one), or a one-line
    error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Step3Error(f"--host {host}: cannot resolve ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = " (another server is using it; pick another --port, or 0 for a free one)" \
            if e.errno == errno.EADDRINUSE else ""
        raise Step3Error(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    sock.listen(2048)  # connections queue from now on, while uvicorn starts
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def use_cache(directory: str | None) -> None:
    """JAX's persistent compilation cache in ``directory`` (``none``: off)."""
    if not directory or directory == "none":
        return
    import jax

    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise Step3Error(f"--compilation-cache {directory}: cannot create ({e.strerror})") \
            from None
    jax.config.update("jax_compilation_cache_dir", directory)
    log.info("compilation cache: %s", directory)


def _uvicorn_server(app, sock, args):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with SIGINT/SIGTERM ending the serve loop gracefully and *not*
        re-raised afterwards (uvicorn re-raises them, which would end the process with the
        signal's status instead of draining to exit 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            saved = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT,
                                                                     signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in saved.items():
                    signal.signal(s, handler)

    uv_log = logging.getLogger("uvicorn")
    uv_log.handlers[:] = log.handlers
    uv_log.propagate = False
    uv_log.setLevel(log.level)
    config = uvicorn.Config(app, log_config=None, access_log=args.access_log, lifespan="off",
                            timeout_graceful_shutdown=args.drain_timeout,
                            log_level=logging.getLevelName(log.level).lower())
    return Server(config)


def serve(args) -> None:
    from step3_jax.checkpoint.loader import load_tokenizer
    from step3_jax.cli import common
    from step3_jax.serving import chat
    from step3_jax.serving.app import ServerState, create_app
    from step3_jax.serving.metrics import ServerMetrics

    # 1. checks, before any weight loads
    if args.drain_timeout < 0:
        raise Step3Error(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.max_queued < 1:
        raise Step3Error(f"--max-queued must be >= 1, got {args.max_queued}")
    if args.mesh:
        from step3_jax.model.sharding import parse_mesh

        parse_mesh(args.mesh)
    common.check_engine_flags(args)
    cfg = common.config(args)
    common.refuse_engine(cfg)
    max_len = args.max_model_len or cfg.max_position_embedding
    if not 1 <= max_len <= cfg.max_position_embedding:
        raise Step3Error(f"--max-model-len must be in 1..{cfg.max_position_embedding} (the "
                         f"model's context), got {args.max_model_len}")
    plan = common.afd_plan(args)
    tokenizer = load_tokenizer(args.checkpoint)
    def special(i) -> str:  # a special token's text, for templates that write it
        ok = tokenizer is not None and i is not None and i >= 0
        return (tokenizer.id_to_token(i) or "") if ok else ""

    template = chat.load(args.checkpoint, args.chat_template, bos_token=special(cfg.bos_token_id),
                         eos_token=special(next(iter(cfg.eos_token_ids), -1)))
    common.check_memory(args, cfg, plan, batch=args.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
                        longest=min(max_len, args.prefill_chunk or max_len), new_tokens=1)
    sock = bind(args.host, args.port)
    name = args.served_model_name or common.model_name(args, cfg)
    use_cache(args.compilation_cache)

    # 2. weights and the engine
    params, cfg = common.load(args, plan)
    model = None
    if plan is not None:
        from step3_jax.runtime import afd

        model = afd.place(params, cfg, plan)
    engine = common.engine(args, params, cfg, model, max_model_len=max_len)
    metrics = ServerMetrics(name)
    placement = engine.runner.placement
    devices = sorted({d for k, v in placement.items() if "devices" in k for d in v})
    state = ServerState(model_name=name, vocab_size=cfg.vocab_size,
                        eos_ids=tuple(t for t in cfg.eos_token_ids if t >= 0),
                        max_model_len=engine.max_model_len, metrics=metrics,
                        tokenizer=tokenizer, template=template, api_key=args.api_key,
                        status="compiling")
    state.info = {"devices": len(devices), "placement": placement,
                  "max_num_seqs": engine.max_num_seqs, "page_size": engine.page_size,
                  "num_pages": engine.num_pages * engine.groups,
                  "kv_cache_bytes": engine.num_pages * engine.groups * engine.page_bytes,
                  "max_model_len": engine.max_model_len}
    metrics.on_step(engine)
    app = create_app(state)
    server = _uvicorn_server(app, sock, args)
    url = url_of(sock)
    log.info("serving %r on %s (OpenAI API under %s/v1; /health, /metrics)", name, url, url)
    log.info("placement: %s; %d device%s", placement, len(devices), "s"[:len(devices) != 1])
    log.info("KV cache: %d pages of %d tokens (%.1f MB), up to %d sequences of %d tokens; "
             "chat template: %s; API key: %s", state.info["num_pages"], engine.page_size,
             state.info["kv_cache_bytes"] / 1e6, engine.max_num_seqs, engine.max_model_len,
             template.origin if template else "none (chat answers 400)",
             "required" if args.api_key else "none")

    # 3. compile while /health says so, then take requests
    failure: list[str] = []

    def compile_then_serve() -> None:
        from step3_jax.runtime.engine_setup import compile_programs
        from step3_jax.serving.engine_loop import EngineLoop

        try:
            done = compile_programs(engine, progress=not args.quiet)
        except Exception as e:  # nothing can be served: stop the server, say why
            failure.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            state.status = "failed"
            server.should_exit = True
            return
        loop = EngineLoop(engine, max_queued=args.max_queued, on_step=metrics.on_step,
                          on_finish=metrics.on_finish)
        loop.start()
        state.loop, state.status = loop, "ok"
        log.info("ready: %d prefill and %d decode programs compiled in %.1f s; %s/health "
                 "answers 200", done["prefill_programs"], done["decode_programs"],
                 done["seconds"], url)

    started = time.perf_counter()
    threading.Thread(target=compile_then_serve, name="step3-jax-compile", daemon=True).start()
    asyncio.run(server.serve(sockets=[sock]))

    # 4. drained (uvicorn waited for the responses in flight): stop the engine
    if state.loop is not None:
        in_flight = state.loop.in_flight()
        state.loop.stop()
        m = engine.metrics()
        log.info("stopped after %.0f s: %d requests finished, %d cancelled%s",
                 time.perf_counter() - started, m["finished"], m["cancelled"],
                 f", {in_flight} cut off by --drain-timeout" if in_flight else "")
    if failure:
        raise Step3Error(f"compiling the engine's programs failed: {failure[0]}")
