"""``step3-jax loadtest``: measure an OpenAI-compatible server from the client — one run at a
given load, or the paper's SLA sweep (:mod:`step3_jax.serving.loadtest`,
:mod:`step3_jax.serving.sweep`). Never imports JAX."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys

from step3_jax.cli import common
from step3_jax.cli.common import log
from step3_jax.errors import Step3Error

DEFAULT_URL = "http://127.0.0.1:8000"


def lens(text: str) -> tuple[int, int]:
    """``MIN:MAX`` or one length (an argparse type)."""
    lo, sep, hi = text.partition(":")
    hi = hi if sep else lo
    if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, or one "
                                         f"length, got {text!r}")
    return int(lo), int(hi)


def rate(text: str) -> float:
    """A request rate > 0 per second, or ``inf`` (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # NaN included
        raise argparse.ArgumentTypeError(f"expected a rate > 0 (requests per second) or inf, "
                                         f"got {text!r}")
    return value


def positive_int(text: str) -> int:
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _ascending(kind):
    def parse(text: str) -> list:
        values = [kind(t) for t in text.split(",") if t.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if any(b <= a for a, b in zip(values, values[1:])):
            raise argparse.ArgumentTypeError(f"expected levels in increasing order (the sweep "
                                             f"raises the load), got {text!r}")
        return values
    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "loadtest", help="measure an OpenAI-compatible server: latencies, throughput, SLA sweep",
        description="Send a seeded mix of random-token-id requests to an OpenAI-compatible "
                    "server (POST /v1/completions, streamed, ignore_eos, return_token_ids) and "
                    "measure TTFT, TPOT, ITL and end-to-end latency (p50/p90/p99 and mean, ms), "
                    "request and token throughput and output tokens/s per device. With "
                    "--sla-tpot, sweep the load upward and report the highest throughput whose "
                    "TPOT percentile meets the SLA (the paper's Table 8 method). Output: a "
                    "markdown table, or one JSON document with --json.")
    s = p.add_argument_group("server")
    s.add_argument("--url", default=DEFAULT_URL,
                   help=f"the server's base URL (default {DEFAULT_URL}; a trailing /v1 is "
                        "dropped); proxy environment variables are ignored")
    s.add_argument("--model", metavar="NAME",
                   help="the model to ask for (default: the first GET /v1/models lists)")
    s.add_argument("--api-key", metavar="KEY",
                   help="sent as 'Authorization: Bearer KEY' on every request")
    s.add_argument("--wait-ready", type=float, default=600.0, metavar="SECONDS",
                   help="wait at most this long for GET /health to answer 200 while the server "
                        "loads or compiles (503), and at most min(this, 10 s) while nothing "
                        "answers (default 600)")
    s.add_argument("--devices", type=positive_int, metavar="N",
                   help="devices the server runs on, for tokens/s per device (default: "
                        "'devices' from GET /health)")
    m = p.add_argument_group("request mix")
    m.add_argument("--num-requests", type=positive_int, default=100, metavar="N",
                   help="requests per run (per level in a sweep; the same seeded mix at every "
                        "level; default 100)")
    m.add_argument("--prompt-lens", type=lens, default=(128, 1024), metavar="MIN:MAX",
                   help="prompt lengths in tokens, uniform; one number: fixed (default "
                        "128:1024); prompts are random token ids below the model's vocab_size")
    m.add_argument("--output-lens", type=lens, default=(16, 128), metavar="MIN:MAX",
                   help="max_tokens per request, uniform; one number: fixed (default 16:128; "
                        "ignore_eos, so each request gets exactly this many)")
    m.add_argument("--seed", type=int, default=0,
                   help="seed of the mix and of the Poisson arrivals (default 0)")
    m.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="per-request limit; a request past it counts as failed (default 600)")
    a = p.add_argument_group(
        "offered load",
        "one of these; default: every request at once (--request-rate inf)")
    x = a.add_mutually_exclusive_group()
    x.add_argument("--request-rate", type=rate, metavar="R",
                   help="Poisson arrivals, R requests/s on average (exponential gaps, seeded); "
                        "inf: all at once")
    x.add_argument("--concurrency", type=positive_int, metavar="C",
                   help="C clients, each sending its next request as its last one ends")
    x.add_argument("--request-rates", type=_ascending(rate), metavar="R1,R2,...",
                   help="a run per rate, in increasing order (e.g. 1,2,4,8,inf)")
    x.add_argument("--concurrencies", type=_ascending(positive_int), metavar="C1,C2,...",
                   help="a run per concurrency, in increasing order (e.g. 1,2,4,8)")
    g = p.add_argument_group("SLA sweep")
    g.add_argument("--sla-tpot", type=positive_float, metavar="MS",
                   help="the SLA on time per output token, in ms (the paper: 50): the levels "
                        "run in order and the sweep stops after the first whose TPOT "
                        "percentile exceeds it; reports the peak output tokens/s (and per "
                        "device) among the levels that met it")
    g.add_argument("--sla-percentile", type=float, default=90.0, metavar="P",
                   help="the TPOT percentile the SLA applies to, 0 < P <= 100 (default 90)")
    o = p.add_argument_group("output")
    o.add_argument("--label", metavar="TEXT",
                   help="name this run (e.g. colocated, afd): in the table, the JSON and the "
                        "plot's legend")
    o.add_argument("--plot", metavar="FILE.png",
                   help="draw TPOT and TTFT (at the SLA percentile) against output tokens/s, "
                        "with the SLA line (needs matplotlib)")
    o.add_argument("--compare", nargs="+", default=[], metavar="FILE.json",
                   help="with --plot: also draw these earlier `loadtest --json` results, a "
                        "curve each (their --label, else the file name)")
    common.output_args(p)
    return p


def _loads(args) -> tuple[str, list[dict]]:
    from step3_jax.serving.sweep import load

    if args.concurrency is not None or args.concurrencies:
        return "concurrency", [load(concurrency=c)
                               for c in args.concurrencies or [args.concurrency]]
    rates = args.request_rates or [math.inf if args.request_rate is None else args.request_rate]
    return "request_rate", [load(request_rate=r) for r in rates]


def _read_compare(path: str) -> dict:
    from step3_jax.serving.sweep import check_result

    text = common.read_text_file(path, "--compare")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise Step3Error(f"--compare {path}: not JSON ({e})") from None
    return check_result(doc, path)


def _check(args) -> None:
    if not 0 < args.sla_percentile <= 100:
        raise Step3Error(f"--sla-percentile must be in (0, 100], got {args.sla_percentile:g}")
    if not (args.wait_ready >= 0 and math.isfinite(args.wait_ready)):
        raise Step3Error(f"--wait-ready must be >= 0 seconds, got {args.wait_ready:g}")
    if args.compare and not args.plot:
        raise Step3Error("--compare goes with --plot (it adds curves to the plot)")


def run(args) -> dict:
    from tqdm import tqdm

    from step3_jax.serving import loadtest, sweep

    _check(args)
    url = loadtest.base_url(args.url)
    compare = [_read_compare(path) for path in args.compare]  # before waiting on the server
    mode, loads = _loads(args)
    health = loadtest.wait_ready(url, args.wait_ready, args.api_key)
    devices = args.devices
    if devices is None:
        devices = health.get("devices") if isinstance(health.get("devices"), int) else None
        if devices is None or devices < 1:
            devices = None
            log.warning("GET /health gives no device count: pass --devices N for tokens/s "
                        "per device")
    entry = loadtest.served_model(url, args.model, args.api_key)
    longest = args.prompt_lens[1] + args.output_lens[1]
    if isinstance(entry.get("max_model_len"), int) and longest > entry["max_model_len"]:
        raise Step3Error(f"--prompt-lens + --output-lens reach {longest} tokens, past the "
                         f"model's max_model_len {entry['max_model_len']}")
    mix = loadtest.request_mix(args.num_requests, args.prompt_lens, args.output_lens,
                               entry["vocab_size"], seed=args.seed)
    percentiles = (*loadtest.PERCENTILES, args.sla_percentile)
    log.info("%s (%s devices): %d requests per level, prompts %d-%d tokens, outputs %d-%d",
             entry["id"], devices or "unknown", len(mix), *args.prompt_lens, *args.output_lens)

    def measure(point: dict) -> dict:
        name = sweep.level_name(point)
        with tqdm(total=len(mix), desc=name, unit="req", file=sys.stderr, leave=False,
                  disable=args.quiet) as bar:
            results = asyncio.run(loadtest.run_level(
                url, entry["id"], mix, request_rate=_rate(point), concurrency=point["concurrency"],
                seed=args.seed, api_key=args.api_key, timeout=args.timeout, progress=bar))
        summary = loadtest.summarize(results, load=point, devices=devices,
                                     percentiles=percentiles)
        tpot = summary[loadtest.pkey("tpot", args.sla_percentile)]
        log.info("%s: %d done, %d failed, %s output tokens/s, TPOT p%g %s ms", name,
                 summary["completed"], summary["failed"], summary["output_tokens_per_s"],
                 args.sla_percentile, tpot)
        if summary["failed"]:
            log.warning("%s: %d of %d requests failed; the first: %s", name, summary["failed"],
                        summary["requests"], summary["first_error"])
        return summary

    swept = sweep.sweep(loads, measure, sla_tpot_ms=args.sla_tpot,
                        percentile=args.sla_percentile)
    doc = {"label": args.label, "url": url, "model": entry["id"], "devices": devices,
           "mode": mode,
           "mix": {"num_requests": len(mix), "prompt_lens": list(args.prompt_lens),
                   "output_lens": list(args.output_lens), "seed": args.seed,
                   "prompt_tokens": sum(len(r.prompt) for r in mix),
                   "max_tokens": sum(r.max_tokens for r in mix)},
           "sla": (None if args.sla_tpot is None else
                   {"tpot_ms": args.sla_tpot, "percentile": args.sla_percentile}),
           **swept, "plot": args.plot}
    if swept["message"] and args.json:  # otherwise it ends the table on stdout
        log.info("%s", swept["message"])
    if args.plot:
        sweep.plot([doc, *compare], args.plot)
        log.info("wrote %s", args.plot)
    if not args.json:
        print(sweep.markdown(doc))
    return doc


def _rate(point: dict) -> float | None:
    r = point["request_rate"]
    return math.inf if r == "inf" else r
