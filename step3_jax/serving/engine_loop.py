"""The engine on its own thread, for a server: requests in, tokens out, nothing shared.

The :class:`~step3_jax.runtime.engine.Engine` is plain Python and not thread-safe, and its step
blocks on the device. :class:`EngineLoop` owns it on one thread: the HTTP side never touches the
engine, it sends commands (add a request, cancel one) through a queue and gets each request's
outputs through the callback it gave with the request (the server hands them to its event loop
with ``call_soon_threadsafe``). The thread steps the engine while it has work and sleeps on the
command queue when idle. A finished request is reported to :class:`ServerMetrics`-like hooks
and forgotten, so a long-running server holds only the requests in flight.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import traceback
from typing import Callable

from step3_jax.errors import Step3Error
from step3_jax.runtime.engine import Engine, RequestOutput

log = logging.getLogger("step3_jax")

IDLE_WAIT_S = 0.05  # how long the idle thread sleeps on the command queue between checks


class Overloaded(Exception):
    """The waiting queue is full (``--max-queued``): the server answers 429 with Retry-After."""


class EngineFailed(Exception):
    """The engine raised on the device side; the requests in flight end with this."""


Sink = Callable[[RequestOutput | Exception], None]


class EngineLoop:
    """``engine`` stepped on a daemon thread. ``max_queued``: requests allowed to wait for a
    slot (submitted, not yet admitted) before :meth:`submit` raises :class:`Overloaded`.
    ``on_step(engine)`` runs after every step and ``on_finish(request)`` once per finished
    request, on the engine thread (metrics)."""

    def __init__(self, engine: Engine, *, max_queued: int,
                 on_step: Callable[[Engine], None] | None = None,
                 on_finish: Callable[[object], None] | None = None):
        self.engine, self.max_queued = engine, max_queued
        self.on_step, self.on_finish = on_step, on_finish
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Sink] = {}
        self._pending = 0                  # submitted, not yet handed to the engine
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failed: str | None = None     # the first device-side error, if any
        self._thread = threading.Thread(target=self._run, name="step3-jax-engine", daemon=True)

    # ----- the HTTP side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def queued(self) -> int:
        """Requests waiting for a slot, including those not yet handed to the engine."""
        return self._pending + len(self.engine.waiting)

    def in_flight(self) -> int:
        return len(self._sinks) + self._pending

    def submit(self, sink: Sink, prompt: list[int], **knobs) -> concurrent.futures.Future:
        """Queue a request (``Engine.add_request``'s arguments); the future resolves to its id,
        or raises the engine's :class:`Step3Error` (a request it refuses). ``sink`` gets every
        :class:`RequestOutput` (the last one ``finished``), or an exception if the engine
        fails."""
        if self.failed is not None:
            raise EngineFailed(self.failed)
        if self._stop.is_set():
            raise EngineFailed("the server is shutting down")
        with self._lock:
            if self.queued() >= self.max_queued:
                raise Overloaded(f"{self.queued()} requests are already waiting "
                                 f"(--max-queued {self.max_queued})")
            self._pending += 1
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", sink, prompt, knobs, future))
        return future

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """Stop a request (a client went away: ``cancelled``; a stop string matched:
        ``stop``); its sink gets a finished output with that reason unless it had already
        finished."""
        self._commands.put(("cancel", request_id, reason))

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread (requests still in flight get an :class:`EngineFailed`)."""
        self._stop.set()
        self._thread.join(timeout)

    # ----- the engine thread ---------------------------------------------------------------
    def _handle(self, command: tuple) -> None:
        if command[0] == "add":
            _, sink, prompt, knobs, future = command
            try:
                rid = self.engine.add_request(prompt, **knobs)
            except Step3Error as e:
                future.set_exception(e)
            else:
                self._sinks[rid] = sink
                future.set_result(rid)
            finally:
                with self._lock:
                    self._pending -= 1
        else:
            _, rid, reason = command
            if self.engine.cancel(rid):
                self.engine.requests[rid].finish_reason = reason
                self._deliver(RequestOutput(rid, [], True, reason))

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is not None:
            sink(out)
        if out.finished:
            self._sinks.pop(out.request_id, None)
            req = self.engine.forget(out.request_id)
            if self.on_finish is not None:
                self.on_finish(req)

    def _early(self, outputs: list[RequestOutput]) -> None:
        """A step's first tokens, before its decode burst: delivered, and the gauges show the
        admissions at once."""
        self._deliver_all(outputs)
        if self.on_step is not None:
            self.on_step(self.engine)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out)

    def _drain(self, block: bool) -> bool:
        """Handle the queued commands (waiting a moment for one if ``block``); any handled?"""
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return False
        self._handle(command)
        while True:
            try:
                self._handle(self._commands.get_nowait())
            except queue.Empty:
                return True

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            if self._drain(block=not engine.has_unfinished()) and self.on_step is not None:
                self.on_step(engine)  # a cancel frees pages between steps
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step(early=self._early)
            except Exception as e:  # a device error: fail what is in flight, refuse new work
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.error("the engine failed; refusing new requests:\n%s",
                          traceback.format_exc())
                break
            self._deliver_all(outputs)
            if self.on_step is not None:
                self.on_step(engine)
        error = EngineFailed(self.failed or "the server is shutting down")
        for rid, sink in list(self._sinks.items()):
            sink(error)
        self._sinks.clear()
        while True:  # adds that never reached the engine
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                command[4].set_exception(error)
