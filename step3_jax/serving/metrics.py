"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own.

Names follow vLLM's where one exists (``...:num_requests_running``, ``...:time_to_first_token_
seconds``), under the ``step3_jax:`` prefix. Gauges are set from the engine after every step;
counters and latency histograms are fed once per finished request, from the engine's own
per-request timings (time to first token from when the engine received the request).
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

# Latency buckets in seconds: from a few milliseconds (a small model's decode step) to minutes
# (a long prompt queued behind others on a CPU).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The metrics of one server; ``model``: the ``model_name`` label on every series."""

    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        label = ["model_name"]
        self.running = Gauge("step3_jax:num_requests_running", "Sequences holding a slot",
                             label, registry=r).labels(model)
        self.waiting = Gauge("step3_jax:num_requests_waiting", "Requests waiting for a slot",
                             label, registry=r).labels(model)
        self.pages_used = Gauge("step3_jax:kv_cache_pages_used", "KV-cache pages in use",
                                label, registry=r).labels(model)
        self.pages_total = Gauge("step3_jax:kv_cache_pages_total", "KV-cache pages in the pool",
                                 label, registry=r).labels(model)
        self.usage = Gauge("step3_jax:kv_cache_usage_perc", "Fraction of KV-cache pages in use",
                           label, registry=r).labels(model)
        self.preemptions = Counter("step3_jax:num_preemptions", "Sequences preempted "
                                   "(recomputed later) for lack of KV pages", label,
                                   registry=r).labels(model)
        self.prompt_tokens = Counter("step3_jax:prompt_tokens", "Prompt tokens of finished "
                                     "requests", label, registry=r).labels(model)
        self.generation_tokens = Counter("step3_jax:generation_tokens", "Tokens generated",
                                         label, registry=r).labels(model)
        self.finished = Counter("step3_jax:request_success", "Finished requests by reason",
                                label + ["finish_reason"], registry=r)
        self.ttft = Histogram("step3_jax:time_to_first_token_seconds", "Time to first token",
                              label, buckets=TTFT_BUCKETS, registry=r).labels(model)
        self.tpot = Histogram("step3_jax:time_per_output_token_seconds",
                              "Time per output token after the first", label,
                              buckets=TPOT_BUCKETS, registry=r).labels(model)
        self.e2e = Histogram("step3_jax:e2e_request_latency_seconds", "Request latency", label,
                             buckets=E2E_BUCKETS, registry=r).labels(model)
        self.model = model
        self._preempted = 0
        self._generated = 0

    def on_step(self, engine) -> None:
        """Engine-wide gauges and counters, after an engine step (engine thread)."""
        m = engine.metrics()
        self.running.set(m["running"])
        self.waiting.set(m["waiting"])
        self.pages_used.set(m["pages_used"])
        self.pages_total.set(m["pages_total"])
        self.usage.set(m["pages_used"] / m["pages_total"] if m["pages_total"] else 0.0)
        self.preemptions.inc(max(0, m["preemptions"] - self._preempted))
        self.generation_tokens.inc(max(0, m["generated_tokens"] - self._generated))
        self._preempted, self._generated = m["preemptions"], m["generated_tokens"]

    def on_finish(self, req) -> None:
        """One finished request's counts and latencies (engine thread)."""
        self.finished.labels(self.model, req.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(req.prompt))
        t = req.timings()
        if t["ttft_s"] is not None:
            self.ttft.observe(t["ttft_s"])
        if t["tpot_s"] is not None:
            self.tpot.observe(t["tpot_s"])
        if t["e2e_s"] is not None:
            self.e2e.observe(t["e2e_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
