#!/usr/bin/env python
"""Colocated vs attention-FFN disaggregated decoding on emulated CPU devices.

For one config and batch: the colocated decode step (a ``dp x ep`` mesh over the same number of
devices), then AFD ``A:F`` with 1..4 micro-batches — decode step time, per-layer attention / FFN
/ transfer time, bubble fraction and how long the two groups actually overlapped (all from
``afd.Timeline``, measured on one decode step), and the bytes each way per layer. The bytes are
set beside the paper's 2A2F example (128 tokens per attention GPU, 2 attention GPUs per FFN GPU,
H = 7168: A->F 2 x 128 x 7168 B in FP8, F->A twice that in BF16) computed with the same formula.
``--png`` draws the timeline of the profiled step for the largest micro-batch count.

Emulated devices share this machine's cores: the figures show the schedule and the data volumes,
not what separate accelerators would achieve.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/bench_afd.py --png afd.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from step3_jax import afd  # noqa: E402
from step3_jax.checkpoint import load  # noqa: E402
from step3_jax.generate import Generator  # noqa: E402
from step3_jax.sharding import parse_mesh  # noqa: E402


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def paper_2a2f_bytes(plan: afd.AfdPlan, model: afd.AfdModel) -> dict:
    """The paper's 2A2F per-layer, per-FFN-GPU volumes, and ours from the same formula."""
    tokens, hidden = 2 * 128, 7168
    paper = {"a2f": tokens * hidden * 1, "f2a": tokens * hidden * 2}
    k = model.cfg.moe_top_k
    ours = {"a2f": tokens * (hidden * 1 + 4 + 8 * k), "f2a": tokens * hidden * 2}
    return {"tokens": tokens, "hidden": hidden, "paper": paper, "formula": ours,
            "difference": "our A->F adds a float32 scale per token and the top-k routing "
                          "(float32 weight + int32 id per expert), which the paper's example omits"}


def draw(intervals: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"attention": 2, "transfer": 1, "ffn": 0}
    colors = {"attention": "tab:blue", "a2f": "tab:orange", "f2a": "tab:green", "ffn": "tab:red"}
    fig, ax = plt.subplots(figsize=(11, 3))
    for op in intervals:
        ax.barh(rows[op["group"]], 1e3 * (op["end"] - op["start"]), left=1e3 * op["start"],
                height=0.6, color=colors[op["kind"]], edgecolor="black", linewidth=0.3)
    ax.set_yticks(list(rows.values()), ["attention group", "transfers", "FFN group"])
    ax.set_xlabel("ms since the step's first dispatch")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, ["attention", "A->F", "F->A", "FFN"], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="bench", help="preset or config.json (default bench)")
    ap.add_argument("--afd", default="2:2", help="A:F (default 2:2)")
    ap.add_argument("--ffn-mesh", default=None, help="ep=N,tp=N for the FFN group")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--micro-batches", default="1,2,3,4")
    ap.add_argument("--transfer-dtype", default="float8_e4m3fn")
    ap.add_argument("--png", default=None, help="timeline plot of the largest micro-batch count")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)

    params, cfg = load(config=args.config, progress=False)
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, cfg.vocab_size, size=(args.batch, args.prompt_len)).tolist()
    a, f = (int(x) for x in args.afd.split(":"))
    report = {"config": cfg.name, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "jax": jax.__version__, "afd": args.afd}

    mesh = parse_mesh(f"dp={a},ep={f}") if a * f <= len(jax.devices()) else parse_mesh(f"dp={a}")
    colo_params, _ = load(config=args.config, progress=False, mesh=mesh)
    gen = Generator(colo_params, cfg)
    gen(prompts, max_new_tokens=args.new_tokens, eos_ids=[])  # compile
    _, m = gen(prompts, max_new_tokens=args.new_tokens, eos_ids=[])
    report["colocated"] = {"mesh": m["mesh"], "decode_step_ms": m["decode_step_ms"]}
    log(f"colocated {m['mesh']}: {m['decode_step_ms']:.1f} ms/step")
    del colo_params, gen

    runs, last = [], None
    for mb in [int(x) for x in args.micro_batches.split(",")]:
        plan = afd.parse_plan(args.afd, args.ffn_mesh, mb, args.transfer_dtype)
        model = afd.place(params, cfg, plan)
        _, met = afd.generate(model, prompts, max_new_tokens=args.new_tokens, eos_ids=[],
                              keep_timeline=True)
        row = {k: v for k, v in met["afd"].items() if k != "timeline"}
        row["decode_step_ms"] = met["decode_step_ms"]
        runs.append(row)
        last = (mb, met["afd"]["timeline"])
        log(f"AFD {args.afd}, {mb} micro-batches: {met['decode_step_ms']:.1f} ms/step; per layer "
            f"attention {row['attention_ms_per_layer']:.2f} ms, FFN {row['ffn_ms_per_layer']:.2f}"
            f" ms, transfer {row['transfer_ms_per_layer']:.2f} ms; bubble "
            f"{row['bubble_fraction']:.2f}; overlap {row['overlap_ms']:.1f} ms; "
            f"A->F {row['a2f_bytes_per_layer']} B, F->A {row['f2a_bytes_per_layer']} B per layer")
        report["placement"] = met["placement"]
        report["paper_2a2f_bytes"] = paper_2a2f_bytes(plan, model)
        del model
    report["afd_runs"] = runs
    if args.png and last:
        draw(last[1], args.png, f"AFD {args.afd}, {last[0]} micro-batches, {cfg.name}: one "
                                f"decode step")
        log(f"timeline written to {args.png}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
