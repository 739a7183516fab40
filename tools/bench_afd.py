#!/usr/bin/env python
"""Colocated vs attention-FFN disaggregated decoding on emulated CPU devices, and whether the two
AFD groups really overlap.

For one config and batch: the colocated decode step (a ``dp x ep`` mesh over the same devices),
then AFD ``A:F`` with 1..4 micro-batches under two schedules, interleaved run by run:

* ``pipelined`` — ``afd.generate``'s schedule: nothing on the host waits for a device within a
  step, so the FFN group can work on micro-batch ``i`` while the attention group works on
  ``i + 1``;
* ``serial`` — the same programs with a block after every op: the groups can never overlap,
  and every op pays a host round trip;
* ``lockstep`` — no host blocking, but each attention launch waits on device for the previous
  FFN result: the groups can never overlap, and there are no host round trips. ``pipelined``
  vs ``lockstep`` is what the overlap itself buys.

Per setting: the decode step time (median and minimum over the runs of each run's median
unprofiled step; the minimum is the least disturbed by other jobs on a shared machine),
the cores this process kept busy over a whole generate call (CPU time / wall time),
and from a ``jax.profiler`` trace of one step (``afd_trace.device_intervals``: per-device execution
events the XLA:CPU runtime records) the per-layer attention / FFN / transfer times, bubble
fraction and how long both groups were busy at once; the bytes each way per layer beside the
paper's 2A2F example. If the pipelined step is not faster than the lockstep one, the overlap
the trace shows bought nothing (the groups then only shared the same cores).

``--png`` draws every schedule's traced step for one micro-batch count, one row per
device. ``--single-thread-ops`` sets ``--xla_cpu_multi_thread_eigen=false`` (no intra-op
threading in XLA's Eigen kernels), so each group's programs use fewer cores at once.

    python tools/bench_afd.py --config bench --png docs/afd_trace.png --json

``--runtime-rules`` instead measures the two XLA:CPU behaviours the schedule is built around
(see ``step3_jax/runtime/afd_schedule.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def paper_2a2f_bytes(k: int) -> dict:
    """The paper's 2A2F per-layer, per-FFN-GPU volumes, and ours from the same formula."""
    tokens, hidden = 2 * 128, 7168
    paper = {"a2f": tokens * hidden * 1, "f2a": tokens * hidden * 2}
    ours = {"a2f": tokens * (hidden * 1 + 4 + 8 * k), "f2a": tokens * hidden * 2}
    return {"tokens": tokens, "hidden": hidden, "paper": paper, "formula": ours,
            "difference": "our A->F adds a float32 scale per token and the top-k routing "
                          "(float32 weight + int32 id per expert), which the paper's example omits"}


def draw(panels: list[tuple[str, list[dict]]], path: str, title: str) -> None:
    """One panel per schedule; one row per device (attention devices on top), transfer waits
    on their own row; colour by micro-batch, hatched FFN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 1.3 + 1.1 * len(panels) * 2.2),
                             squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (name, intervals) in zip(axes[:, 0], panels):
        devices = sorted({(iv["group"] != "attention", iv["device"]) for iv in intervals
                          if iv["device"] is not None})
        rows = {dev: len(devices) - n for n, (_, dev) in enumerate(devices)}
        labels = {rows[d]: f"{'attention' if not f else 'FFN'} dev {d}" for f, d in devices}
        rows[None] = 0
        labels[0] = "transfer wait"
        for iv in intervals:
            ax.barh(rows[iv["device"]], 1e3 * (iv["end"] - iv["start"]),
                    left=1e3 * iv["start"], height=0.7, color=colors(iv["mb"] % 10),
                    hatch="//" if iv["kind"] == "ffn" else None, edgecolor="black",
                    linewidth=0.2)
        ax.set_yticks(list(labels), list(labels.values()))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("ms from the step's first launch")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(j)) for j in range(
        1 + max(iv["mb"] for _, ivs in panels for iv in ivs))]
    axes[0, 0].legend(handles, [f"micro-batch {j}" for j in range(len(handles))],
                      loc="upper right", fontsize=7, ncol=len(handles))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def runtime_rules(jax, afd) -> dict:
    """The two XLA:CPU behaviours ``afd_schedule.py``'s schedule is built around, measured here.

    1. Two 2-device programs on disjoint device pairs, dispatched back to back: when does the
       second start (per-device launches from a trace)? Then two single-device programs.
    2. How long ``jax.device_put`` takes to return when its source is still being computed
       (~0.1-0.2 s of matmuls), for each kind of source and target layout.
    """
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from step3_jax.runtime import afd_trace

    devs = jax.devices()
    mesh_a, mesh_f = Mesh(np.array(devs[:2]), ("d",)), Mesh(np.array(devs[2:4]), ("d",))

    @jax.jit
    def work(x):
        for _ in range(24):
            x = jnp.tanh(x @ x)
        return x

    split = lambda mesh: NamedSharding(mesh, P("d"))  # noqa: E731
    xa = jax.device_put(jnp.ones((2, 384, 384)) / 384, split(mesh_a))
    xf = jax.device_put(jnp.ones((2, 384, 384)) / 384, split(mesh_f))
    x0, x2 = (jax.device_put(jnp.ones((384, 384)) / 384, devs[i]) for i in (0, 2))
    out = {}
    for name, args in (("two 2-device programs", (xa, xf)), ("two 1-device programs", (x0, x2))):
        jax.block_until_ready([work(x) for x in args])  # compile
        _, trace = afd_trace.traced(lambda: [work(x) for x in args])
        spans = {}
        for plane in trace.planes:
            for line in plane.lines:
                for ev in line.events:
                    st = dict(ev.stats)
                    if "device_ordinal" in st and "hlo_module" in st:
                        d = int(st["device_ordinal"])
                        a, b = spans.get(d, (ev.start_ns, ev.start_ns))
                        spans[d] = (min(a, ev.start_ns), max(b, ev.start_ns + ev.duration_ns))
        t0 = min(a for a, _ in spans.values())
        out[name] = {f"device {d}": [round((a - t0) / 1e6, 2), round((b - t0) / 1e6, 2)]
                     for d, (a, b) in sorted(spans.items())}
    for name, src, dst in (
            ("sharded on 2 devices -> replicated on 2 others", xa, NamedSharding(mesh_f, P())),
            ("sharded on 2 devices -> sharded on 2 others", xa, split(mesh_f)),
            ("1 device -> replicated on 2 others", x0, NamedSharding(mesh_f, P())),
            ("1 device -> 1 other device", x0, devs[3])):
        y = work(src)
        t = time.perf_counter()
        z = jax.device_put(y, dst)
        returned = time.perf_counter() - t
        jax.block_until_ready(z)
        out[name] = {"returned_ms": round(1e3 * returned, 2),
                     "ready_ms": round(1e3 * (time.perf_counter() - t), 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="bench", help="preset or config.json (default bench)")
    ap.add_argument("--layers", type=int, default=None,
                    help="keep the first N layers (first and last dense, the rest MoE), to "
                         "fit memory; per-layer figures are unaffected")
    ap.add_argument("--afd", default="2:2", help="A:F (default 2:2)")
    ap.add_argument("--ffn-mesh", default=None, help="ep=N,tp=N for the FFN group")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--micro-batches", default="1,2,3,4")
    ap.add_argument("--transfer-dtype", default="float8_e4m3fn")
    ap.add_argument("--repeats", type=int, default=3,
                    help="generate calls per schedule and micro-batch count (default 3)")
    ap.add_argument("--no-colocated", action="store_true", help="skip the colocated baseline")
    ap.add_argument("--single-thread-ops", action="store_true",
                    help="XLA_FLAGS += --xla_cpu_multi_thread_eigen=false")
    ap.add_argument("--png", default=None, help="trace plot (per device, every schedule)")
    ap.add_argument("--plot-micro-batches", type=int, default=None,
                    help="the micro-batch count to plot (default the largest)")
    ap.add_argument("--runtime-rules", action="store_true",
                    help="only measure the two XLA:CPU behaviours the schedule avoids "
                         "(multi-device programs one at a time; a blocking device_put)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)

    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=8"
    if args.single_thread_ops:
        flags += " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags.strip()

    import jax
    import numpy as np

    from step3_jax.checkpoint.loader import load
    from step3_jax.model.config import load_config
    from step3_jax.model.sharding import parse_mesh
    from step3_jax.runtime import afd, afd_schedule
    from step3_jax.runtime.generate import Generator

    if args.runtime_rules:
        rules = runtime_rules(jax, afd)
        for name, got in rules.items():
            log(f"{name}: {got}")
        if args.json:
            print(json.dumps({"jax": jax.__version__, "runtime_rules": rules}, indent=2))
        return 0
    overrides = {}
    if args.layers:
        n = args.layers
        overrides = {"num_hidden_layers": n, "moe_layers": tuple(range(1, n - 1))}
    cfg = load_config(args.config, **overrides)
    a, f = (int(x) for x in args.afd.split(":"))
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, cfg.vocab_size, size=(args.batch, args.prompt_len)).tolist()
    report = {"config": cfg.name, "layers": cfg.num_hidden_layers, "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "jax": jax.__version__, "afd": args.afd, "xla_flags": os.environ["XLA_FLAGS"],
              "cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0],
              "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}

    if not args.no_colocated:
        mesh = parse_mesh(f"dp={a},ep={f}")
        params, _ = load(config=args.config, progress=False, mesh=mesh, **overrides)
        gen = Generator(params, cfg)
        gen(prompts, max_new_tokens=args.new_tokens, eos_ids=[])  # compile
        steps = [gen(prompts, max_new_tokens=args.new_tokens, eos_ids=[])[1]["decode_step_ms"]
                 for _ in range(args.repeats)]
        report["colocated"] = {"mesh": f"dp={a},ep={f}", "decode_step_ms": statistics.median(
            steps), "runs_decode_step_ms": steps}
        log(f"colocated dp={a},ep={f}: {statistics.median(steps):.1f} ms/step")
        del params, gen

    plan = afd.parse_plan(args.afd, args.ffn_mesh, 1, args.transfer_dtype)
    params, _ = load(config=args.config, progress=False, shardings=afd.afd_shardings(cfg, plan),
                     expert_parallel=plan.ffn_ep, **overrides)
    runs, traces = [], {}
    for mb in [int(x) for x in args.micro_batches.split(",")]:
        plan = afd.parse_plan(args.afd, args.ffn_mesh, mb, args.transfer_dtype)
        model = afd.place(params, cfg, plan)  # already on the groups: nothing moves
        for schedule in afd_schedule.SCHEDULES:  # compile both before timing
            afd.generate(model, prompts, max_new_tokens=3, eos_ids=[], schedule=schedule,
                         profile=False)
        got = {s: [] for s in afd_schedule.SCHEDULES}
        for _ in range(args.repeats):
            # interleaved: drift on a shared machine hits both
            for schedule in afd_schedule.SCHEDULES:
                wall, cpu = time.perf_counter(), time.process_time()
                _, met = afd.generate(model, prompts, max_new_tokens=args.new_tokens,
                                      eos_ids=[], schedule=schedule, keep_timeline=True)
                met["cores_used"] = (time.process_time() - cpu) / (time.perf_counter() - wall)
                got[schedule].append(met)
        for schedule, mets in got.items():
            timed = [x for x in mets if x["afd"].get("timeline_source")]
            row = {k: v for k, v in mets[0]["afd"].items() if not isinstance(v, (float, list))}
            for key in ("attention_ms_per_layer", "ffn_ms_per_layer", "transfer_ms_per_layer",
                        "dispatch_wait_ms_per_layer", "step_ms", "bubble_fraction",
                        "overlap_ms"):
                row[key] = statistics.median(x["afd"][key] for x in timed) if timed else None
            row["decode_step_ms"] = statistics.median(x["decode_step_ms"] for x in mets)
            row["decode_step_ms_min"] = min(x["decode_step_ms"] for x in mets)
            row["cores_used"] = statistics.median(x["cores_used"] for x in mets)
            row["runs_decode_step_ms"] = [x["decode_step_ms"] for x in mets]
            runs.append(row)
            # the run whose traced step is the median one, for the plot
            if timed:
                pick = sorted(timed, key=lambda x: x["afd"]["step_ms"])[len(timed) // 2]
                traces[(mb, schedule)] = pick["afd"]["timeline"]
            log(f"AFD {args.afd}, {mb} micro-batches, {schedule}: "
                f"{row['decode_step_ms']:.1f} ms/step; traced step {row['step_ms']:.1f} ms, "
                f"per layer attention {row['attention_ms_per_layer']:.2f} ms, FFN "
                f"{row['ffn_ms_per_layer']:.2f} ms, transfer {row['transfer_ms_per_layer']:.2f}"
                f" ms, dispatch wait {row['dispatch_wait_ms_per_layer']:.2f} ms; bubble "
                f"{row['bubble_fraction']:.2f}; overlap {row['overlap_ms']:.1f} ms; "
                f"{row['cores_used']:.2f} cores busy")
        report["placement"] = model.placement
        del model
    report["afd_runs"] = runs
    report["paper_2a2f_bytes"] = paper_2a2f_bytes(cfg.moe_top_k)
    report["load_average_after"] = os.getloadavg()[0]
    top = args.plot_micro_batches or (max(mb for mb, _ in traces) if traces else None)
    if args.png and top is not None:
        panels = [(f"{s}: decode step traced (per-device launches from jax.profiler)",
                   traces[(top, s)]) for s in afd_schedule.SCHEDULES if (top, s) in traces]
        draw(panels, args.png, f"AFD {args.afd}, {top} micro-batches, {cfg.name} "
                               f"({cfg.num_hidden_layers} layers), batch {args.batch}")
        log(f"trace plot written to {args.png}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
