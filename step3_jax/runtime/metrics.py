"""The metrics every generation runtime reports, in one schema (issue 17: AFD's differed).

Colocated ``generate``, ``afd.generate`` in one process and multi-process AFD return the same
keys (:data:`KEYS`), built by :func:`report`; AFD adds ``placement`` and ``afd`` beside them.

* ``compile_s``: tracing, lowering and XLA compilation in this call (0 once compiled);
* ``prefill_ms``: the prefill, compilation excluded;
* ``decode_ms``: the decode steps, compilation excluded;
* ``decode_step_ms``: one decode step; ``decode_tokens_per_s`` = ``batch`` / that step.

The colocated runtime compiles ahead of time and times each executable apart. AFD's programs
compile as the schedule first dispatches them, inside the timed prefill and decode step, so
:class:`CompileClock` takes JAX's own compile events and the runtime subtracts them.
"""

from __future__ import annotations

import time

import jax
from jax import monitoring

KEYS = ("batch", "mesh", "prefill_bucket", "prefill_chunk", "cache_capacity",
        "generated_tokens", "decode_steps",
        "compile_s", "prefill_ms", "decode_ms", "decode_step_ms", "decode_tokens_per_s",
        "backend", "dtype")

# JAX's monitoring events for the three stages of compiling a program (jax._src.dispatch).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """Seconds spent compiling while active (a context manager): the union of the time spans
    of JAX's compile events, so a trace nested in another is counted once. Times are
    ``time.time()`` seconds, as JAX records them (:func:`now`)."""

    def __init__(self):
        self.spans: list[tuple[float, float]] = []

    def _on_span(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.spans.append((start, end))

    def __enter__(self):
        monitoring.register_event_time_span_listener(self._on_span)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_time_span_listener(self._on_span)
        return False

    @staticmethod
    def now() -> float:
        return time.time()

    def seconds(self, start: float = float("-inf"), end: float = float("inf")) -> float:
        """Compile time between ``start`` and ``end`` (the union of the spans, clipped)."""
        total, reach = 0.0, start
        for a, b in sorted(self.spans):
            a, b = max(a, reach), min(b, end)
            if b > a:
                total += b - a
                reach = b
        return total


def report(cfg, *, batch: int, mesh: dict, prefill_bucket: int, cache_capacity: int,
           generated_tokens: int, decode_steps: int, compile_s: float, prefill_s: float,
           decode_s: float, decode_step_s: float | None, prefill_chunk: int | None = None) -> dict:
    """The metrics dict (:data:`KEYS`; milliseconds to the microsecond). ``prefill_chunk``:
    the chunk a long prompt was prefilled in, None when it went in whole."""
    return {"batch": batch, "mesh": mesh, "prefill_bucket": prefill_bucket,
            "prefill_chunk": prefill_chunk,
            "cache_capacity": cache_capacity, "generated_tokens": generated_tokens,
            "decode_steps": decode_steps, "compile_s": round(compile_s, 3),
            "prefill_ms": _ms(prefill_s), "decode_ms": _ms(decode_s),
            "decode_step_ms": _ms(decode_step_s) if decode_step_s else None,
            "decode_tokens_per_s": round(batch / decode_step_s, 2) if decode_step_s else None,
            "backend": jax.default_backend(), "dtype": cfg.dtype}


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)
