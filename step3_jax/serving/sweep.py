"""The SLA sweep (the paper's Table 8 method): raise the offered load level by level until the
chosen percentile of TPOT breaks the SLA, and report the highest output throughput that met it;
its markdown table and its latency-against-throughput plot. No JAX; matplotlib only for the
plot, imported when one is drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from step3_jax.errors import Step3Error
from step3_jax.serving.loadtest import pkey


def load(request_rate: float | None = None, concurrency: int | None = None) -> dict:
    """A level's offered load as the JSON records it (an infinite rate as ``"inf"``)."""
    if request_rate is not None and math.isinf(request_rate):
        request_rate = "inf"
    return {"request_rate": request_rate, "concurrency": concurrency}


def level_name(load: dict) -> str:
    if load.get("concurrency") is not None:
        c = load["concurrency"]
        return f"{c} client{'s' if c != 1 else ''}"
    rate = load["request_rate"]
    return "all at once" if rate == "inf" else f"{rate:g} req/s"


def sla_text(tpot_ms: float, percentile: float) -> str:
    return f"TPOT p{percentile:g} <= {tpot_ms:g} ms"


def sweep(loads: list[dict], measure: Callable[[dict], dict], *, sla_tpot_ms: float | None = None,
          percentile: float = 90) -> dict:
    """``measure(load)`` (a summary) for each load in order. With an SLA each summary gets
    ``met_sla`` (its p-th percentile TPOT at most the SLA; a level with no TPOT — nothing
    completed with 2+ tokens — did not meet it) and the sweep stops after the first level that
    did not; ``peak`` is the level with the most output tokens/s among those that met it."""
    key = pkey("tpot", percentile)
    levels = []
    for point in loads:
        summary = measure(point)
        if sla_tpot_ms is None:
            summary["met_sla"] = None
        else:
            value = summary.get(key)
            summary["met_sla"] = value is not None and value <= sla_tpot_ms
        levels.append(summary)
        if summary["met_sla"] is False:
            break
    if sla_tpot_ms is None:
        return {"levels": levels, "peak": None, "message": None}
    sla = sla_text(sla_tpot_ms, percentile)
    met = [s for s in levels if s["met_sla"] and s["output_tokens_per_s"] is not None]
    if not met:
        first = levels[0]
        had = (f"{first[key]:g} ms" if first.get(key) is not None
               else "no TPOT (no request completed with 2+ tokens)")
        return {"levels": levels, "peak": None,
                "message": f"no level met the SLA ({sla}): the first, "
                           f"{level_name(first['load'])}, had {had}"}
    best = max(met, key=lambda s: s["output_tokens_per_s"])
    peak = {"load": best["load"], "output_tokens_per_s": best["output_tokens_per_s"],
            "output_tokens_per_s_per_device": best["output_tokens_per_s_per_device"],
            key: best[key]}
    per_device = best["output_tokens_per_s_per_device"]
    message = (f"peak meeting the SLA ({sla}): {best['output_tokens_per_s']:,.1f} output "
               f"tokens/s" + (f" ({per_device:,.1f} per device)" if per_device is not None
                              else "") + f" at {level_name(best['load'])}")
    if levels[-1]["met_sla"]:
        message += "; every level met it, so the peak may lie above the highest level"
    return {"levels": levels, "peak": peak, "message": message}


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _devices(n: int | None) -> str:
    return "unknown devices" if n is None else f"{n} device{'s' if n != 1 else ''}"


def markdown(doc: dict) -> str:
    """The run as text: a header line, a markdown table (a row per level), the peak's line."""
    mix, sla = doc["mix"], doc.get("sla")
    percentile = sla["percentile"] if sla else 90
    head = (f"{doc['label'] + ': ' if doc.get('label') else ''}{doc['model']} at {doc['url']}, "
            f"{mix['num_requests']} requests per level (prompts {mix['prompt_lens'][0]}-"
            f"{mix['prompt_lens'][1]}, outputs {mix['output_lens'][0]}-"
            f"{mix['output_lens'][1]} tokens, seed {mix['seed']}), "
            f"{_devices(doc['devices'])}"
            + (f", SLA {sla_text(sla['tpot_ms'], percentile)}" if sla else ""))
    extra = [] if percentile in (50, 90, 99) else [percentile]
    cols = (["level", "done/failed", "req/s", "out tok/s", "tok/s/device", "TTFT p50 ms",
             "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms", "TPOT p99 ms"]
            + [f"TPOT p{q:g} ms" for q in extra] + ["ITL p99 ms", "e2e p90 ms", "met SLA"])
    rows = []
    for s in doc["levels"]:
        met = {True: "yes", False: "no", None: "-"}[s["met_sla"]]
        rows.append([level_name(s["load"]), f"{s['completed']}/{s['failed']}",
                     _num(s["request_throughput_per_s"], 2), _num(s["output_tokens_per_s"]),
                     _num(s["output_tokens_per_s_per_device"]), _num(s[pkey("ttft", 50)]),
                     _num(s[pkey("ttft", 90)]), _num(s[pkey("tpot", 50)]),
                     _num(s[pkey("tpot", 90)]), _num(s[pkey("tpot", 99)])]
                    + [_num(s.get(pkey("tpot", q))) for q in extra]
                    + [_num(s[pkey("itl", 99)]), _num(s[pkey("e2e", 90)]), met])
    lines = [head, "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if doc.get("message"):
        lines += ["", doc["message"]]
    return "\n".join(lines)


def check_result(doc, path: str) -> dict:
    """A ``loadtest --json`` document read back for ``--compare``, or a one-line error."""
    ok = (isinstance(doc, dict) and isinstance(doc.get("levels"), list) and doc["levels"]
          and all(isinstance(s, dict) and "output_tokens_per_s" in s and "load" in s
                  for s in doc["levels"]))
    if not ok:
        raise Step3Error(f"--compare {path}: not a `step3-jax loadtest --json` result")
    doc.setdefault("label", None)
    doc["label"] = doc["label"] or Path(path).stem
    return doc


def plot(docs: list[dict], path: str) -> None:
    """TPOT and TTFT (each run's SLA percentile, else p90) against output tokens/s (per device
    when every run knows its devices), a curve per run, the SLA as a dashed line, levels that
    broke it hollow; a PNG at ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Step3Error("--plot needs matplotlib: pip install matplotlib "
                         "(or pip install 'step3-jax[plot]')") from None
    per_device = all(s.get("output_tokens_per_s_per_device") is not None
                     for doc in docs for s in doc["levels"])
    xkey = "output_tokens_per_s_per_device" if per_device else "output_tokens_per_s"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    slas = set()
    for i, doc in enumerate(docs):
        sla = doc.get("sla")
        q = sla["percentile"] if sla else 90
        if sla:
            slas.add((sla["tpot_ms"], q))
        color = f"C{i % 10}"
        name = doc.get("label") or doc.get("model") or f"run {i + 1}"
        for ax, metric in ((left, "tpot"), (right, "ttft")):
            points = [(s[xkey], s.get(pkey(metric, q)), s.get("met_sla"), s["load"])
                      for s in doc["levels"]
                      if s.get(xkey) is not None and s.get(pkey(metric, q)) is not None]
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, lw=1.2,
                    label=f"{name} (p{q:g})")
            for x, y, met, point in points:
                ax.scatter([x], [y], edgecolors=color,
                           facecolors="none" if met is False else color, zorder=3)
                ax.annotate(level_name(point), (x, y), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=color)
    for tpot_ms, q in sorted(slas):
        left.axhline(tpot_ms, color="gray", ls="--", lw=1, label=f"SLA {sla_text(tpot_ms, q)}")
    xlabel = "output tokens/s per device" if per_device else "output tokens/s"
    for ax, title in ((left, "time per output token"), (right, "time to first token")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.set_title(title + (" (hollow: the level broke the SLA)" if slas else ""),
                     fontsize=10)
        ax.margins(x=0.08, y=0.1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as e:
        raise Step3Error(f"--plot {path}: cannot write ({e})") from None
    finally:
        plt.close(fig)
