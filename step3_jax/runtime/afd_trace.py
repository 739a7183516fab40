"""How AFD's groups actually ran: per-device execution intervals from a ``jax.profiler`` trace,
and the stage metrics real AFD systems report.

The XLA:CPU runtime stamps every HLO op it runs with its device and launch, which gives each
device's busy intervals from the executing threads themselves (:func:`device_intervals`).
:func:`summarize` turns them into per-layer attention / FFN / transfer times, the bubble
fraction and how long the two groups were busy at once; comparing the ``pipelined`` schedule
with its ``serial`` and ``lockstep`` controls shows what overlap buys (BENCHMARKS.md).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile

import jax

_log = logging.getLogger(__name__)


def _trace_options():
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # Python-function events would slow the host dispatch down
    return opts


def traced(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), trace)``: the call run under a ``jax.profiler`` trace, its outputs
    awaited; ``trace`` is None when a trace cannot be taken (another one is running)."""
    log_dir = tempfile.mkdtemp(prefix="step3_afd_trace_")
    try:
        try:
            jax.profiler.start_trace(log_dir, profiler_options=_trace_options())
        except RuntimeError as e:  # "Profile has already been started": the caller's own trace
            _log.warning("AFD stage metrics skipped: %s", e)
            return jax.block_until_ready(fn(*args, **kwargs)), None
        try:
            out = jax.block_until_ready(fn(*args, **kwargs))
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
        return out, (jax.profiler.ProfileData.from_file(files[0]) if files else None)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def device_intervals(trace, m, micro_batches: int) -> list[dict] | None:
    """Each device's program executions in a traced ``afd_schedule.stack_pass`` of the
    :class:`~step3_jax.runtime.afd.AfdModel` ``m``, labelled.

    XLA:CPU emits one trace event per HLO op it executes, on the thread executing it, with the
    stats ``hlo_module``, ``device_ordinal`` (the global device id) and ``run_id`` (one launch).
    A launch on a device spans its first op's start to its last op's end. Each device runs its
    programs in dispatch order, so the ``k``-th ``attention_step`` launch on an attention device
    is layer ``k // micro_batches``, micro-batch ``k % micro_batches`` (likewise ``ffn_step``
    on each FFN device). Returns dicts ``group, device, kind, layer, mb, start, end, issued``
    (seconds from the first launch; ``issued``: when the host dispatched that stage, from the
    ``afd/...`` annotations), or None if the trace does not hold exactly the expected launches.
    """
    launches: dict[tuple, list] = {}
    marks: dict[str, int] = {}
    for plane in trace.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name.startswith("afd/"):
                    marks[ev.name] = ev.start_ns
                    continue
                stats = dict(ev.stats)
                module = stats.get("hlo_module")
                if module is None or "device_ordinal" not in stats or "run_id" not in stats:
                    continue
                key = (int(stats["device_ordinal"]), int(stats["run_id"]), str(module))
                span = launches.setdefault(key, [ev.start_ns, ev.start_ns + ev.duration_ns])
                span[0] = min(span[0], ev.start_ns)
                span[1] = max(span[1], ev.start_ns + ev.duration_ns)
    layers = m.cfg.num_hidden_layers
    out = []
    for group, devices, program in (("attention", m.attn_devices, "attention_step"),
                                    ("ffn", m.ffn_devices, "ffn_step")):
        for d in devices:
            runs = sorted(span for (dev, _, module), span in launches.items()
                          if dev == d.id and module.endswith(program))
            if len(runs) != layers * micro_batches:
                _log.warning("AFD trace: %d %s launches on device %d, expected %d; no stage "
                             "metrics", len(runs), program, d.id, layers * micro_batches)
                return None
            for k, (a, b) in enumerate(runs):
                i, j = divmod(k, micro_batches)
                out.append({"group": group, "device": d.id, "kind": group, "layer": i, "mb": j,
                            "start": a, "end": b,
                            "issued": marks.get(f"afd/{group}/{i}/{j}", a)})
    t0 = min(iv["start"] for iv in out)
    for iv in out:
        for key in ("start", "end", "issued"):
            iv[key] = (iv[key] - t0) * 1e-9
    return out


def _union(spans):
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _length(spans) -> float:
    return sum(b - a for a, b in spans)


def _intersect(xs, ys) -> float:
    return sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in xs for a2, b2 in ys)


def summarize(intervals: list[dict], layers: int,
              lockstep: bool = False) -> tuple[dict, list[dict]]:
    """Stage metrics of one step from :func:`device_intervals`, and the transfer waits.

    * ``attention_ms_per_layer`` / ``ffn_ms_per_layer``: one device's busy time per layer
      (summed over micro-batches, averaged over the group's devices);
    * ``transfer_ms_per_layer``: per layer, how long stages waited for their input after its
      producer had finished, their own group was free and the host had issued them — the A→F and
      F→A copies plus the runtime's scheduling, as far as they stall the pipeline;
    * ``dispatch_wait_ms_per_layer``: how long stages waited for the host to issue them after
      their input and group were ready (the Python-driven schedule's own cost);
    * ``bubble_fraction``: ``1 - (A busy + F busy) / (2 x step)``, a group busy while any of its
      devices runs a stage; ``overlap_ms``: how long both groups were busy at once.

    A stage (group, layer, micro-batch) spans its devices' first start to last end. With
    ``lockstep`` an attention stage also waits for the FFN stage dispatched before it.
    """
    busy = {g: _union((iv["start"], iv["end"]) for iv in intervals if iv["group"] == g)
            for g in ("attention", "ffn")}
    wall = max(iv["end"] for iv in intervals) - min(iv["start"] for iv in intervals)
    stage: dict[tuple, dict] = {}
    for iv in intervals:
        key = (iv["group"], iv["layer"], iv["mb"])
        st = stage.setdefault(key, {"start": iv["start"], "end": iv["end"],
                                    "issued": iv["issued"]})
        st["start"], st["end"] = min(st["start"], iv["start"]), max(st["end"], iv["end"])
    order = {g: sorted(k[1:] for k in stage if k[0] == g) for g in ("attention", "ffn")}
    waits, transfer, dispatch = [], 0.0, 0.0
    for g, other, kind in (("ffn", "attention", "a2f"), ("attention", "ffn", "f2a")):
        for n, (i, j) in enumerate(order[g]):
            srcs = [(other, i, j)] if g == "ffn" else [(other, i - 1, j)]
            if g == "attention" and lockstep and n:  # the FFN stage dispatched just before
                srcs.append((other, *order[g][n - 1]))
            srcs = [x for x in srcs if x in stage]
            if not srcs:  # the first layer's attention reads the embedding
                continue
            st = stage[(g, i, j)]
            ready = max(stage[x]["end"] for x in srcs)
            if n:
                ready = max(ready, stage[(g, *order[g][n - 1])]["end"])
            dispatch += max(0.0, st["issued"] - ready)
            ready = max(ready, st["issued"])
            if st["start"] > ready:
                transfer += st["start"] - ready
                waits.append({"group": "transfer", "device": None, "kind": kind, "layer": i,
                              "mb": j, "start": ready, "end": st["start"]})
    per_device = {g: len({iv["device"] for iv in intervals if iv["group"] == g})
                  for g in ("attention", "ffn")}
    stage_ms = {g: 1e3 * sum(iv["end"] - iv["start"] for iv in intervals if iv["group"] == g)
                / (per_device[g] * layers) for g in ("attention", "ffn")}
    return {"attention_ms_per_layer": stage_ms["attention"], "ffn_ms_per_layer": stage_ms["ffn"],
            "transfer_ms_per_layer": 1e3 * transfer / layers,
            "dispatch_wait_ms_per_layer": 1e3 * dispatch / layers,
            "step_ms": 1e3 * wall,
            "bubble_fraction": (1.0 - (_length(busy["attention"]) + _length(busy["ffn"]))
                                / (2 * wall)) if wall > 0 else 0.0,
            "overlap_ms": 1e3 * _intersect(busy["attention"], busy["ffn"])}, waits
