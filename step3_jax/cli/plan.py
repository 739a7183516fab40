"""``step3-jax plan``: the per-device memory of a deployment (:mod:`step3_jax.analysis.plan`),
checked against the compiled decode programs (:mod:`step3_jax.analysis.compiled`), and its
human-readable table."""

from __future__ import annotations

import argparse

from step3_jax.cli import common
from step3_jax.cli.common import log
from step3_jax.errors import Step3Error


def add_parser(sub) -> argparse.ArgumentParser:
    pl = sub.add_parser(
        "plan", help="per-device memory of a deployment: weights, KV cache, activations",
        description="The memory plan of a deployment, colocated (--mesh) or disaggregated "
                    "(--afd): bytes per device for weights, KV cache and activations, from the "
                    "sharded weight declaration (no devices needed, nothing allocated), whether "
                    "they fit --device-memory, and the largest batch that would. The compiled "
                    "check then lowers the real decode programs with abstract inputs on as many "
                    "emulated CPU devices as the plan has and sets XLA's memory analysis beside "
                    "the arithmetic (float32, the CPU MoE kernel). A mesh bigger than this "
                    "machine is fine: the plan is for a cluster.")
    pl.add_argument("--config", default="step3", metavar="PRESET|FILE",
                    help="preset name or config.json path of either family (default step3, the "
                         "full model; step35-flash: Step-3.5-Flash, its sliding-window KV, router "
                         "bias and 288 experts)")
    pa = pl.add_argument_group("placement (one of; neither: one device)")
    pa.add_argument("--afd", metavar="A:F",
                    help="attention on A devices, FFN on F devices (as generate --afd), or the "
                         "paper's 2A2F: servers of 8 devices (2A2F = 16:16); auto: the fewest "
                         "FFN, then attention servers that hold --batch at --context "
                         "(step3_jax/analysis/sizing.py)")
    pa.add_argument("--ffn-mesh", metavar="ep=N,tp=N",
                    help="how the FFN group splits the experts (default ep=F)")
    pa.add_argument("--micro-batches", type=int, default=None, metavar="N",
                    help="AFD micro-batches the batch is split into (default 3)")
    pa.add_argument("--mesh", metavar="dp=N,tp=N,ep=N",
                    help="colocated: dp splits the batch and KV cache, tp heads and widths, ep "
                         "the experts")
    pw = pl.add_argument_group("workload and formats")
    pw.add_argument("--batch", type=int, required=True, metavar="B",
                    help="concurrent sequences")
    pw.add_argument("--context", type=int, required=True, metavar="C",
                    help="KV-cache positions per sequence")
    pw.add_argument("--weights", required=True, choices=("fp8", "bf16"),
                    help="fp8: matmul weights 1 byte + a float32 scale per 128x128 block, "
                         "embedding/LM head/router/norms BF16; bf16: 2 bytes each")
    pw.add_argument("--kv-dtype", required=True, choices=("fp8", "bf16"),
                    help="KV cache bytes per value: 1 (fp8) or 2 (bf16)")
    pw.add_argument("--device-memory", default="80GB", metavar="SIZE",
                    help="memory per device: 80GB (1e9 bytes per GB, default), 80GiB, or bytes")
    pw.add_argument("--compiled-check", default="auto", choices=("auto", "on", "off"),
                    help="lower and compile the decode programs on emulated CPU devices with "
                         "abstract inputs: in this process if it has enough devices, else in a "
                         "child process started with XLA_FLAGS=--xla_force_host_platform_device"
                         "_count=N. auto (default) runs it except for a colocated ep=1 mesh on "
                         "a model with more than 256 experts over its MoE layers (the CPU loop "
                         "kernel compiles one branch per expert: minutes for Step-3); AFD and "
                         "ep>1 compile in seconds even for the full model. Step-3 only: a "
                         "Step-3.5 plan skips it")
    common.output_args(pl)
    return pl


def run(args) -> dict:
    from step3_jax.analysis import compiled, deployment, plan
    from step3_jax.model import family
    from step3_jax.model.step35_reader import load_any_config

    if args.micro_batches is not None and not args.afd:
        raise Step3Error("--micro-batches needs --afd")
    cfg = load_any_config(args.config)
    if family.is_step35(cfg) and args.compiled_check == "on":
        raise Step3Error(f"--compiled-check on: the compiled check lowers Step-3's decode "
                         f"programs; {cfg.name!r} is a Step-3.5 model (use auto or off)")
    micro = 3 if args.micro_batches is None else args.micro_batches
    memory = deployment.parse_bytes(args.device_memory)
    kw = dict(batch=args.batch, context=args.context, weights_format=args.weights,
              kv_dtype=args.kv_dtype, device_memory=memory)
    if (args.afd or "").strip().lower() == "auto":
        if args.mesh or args.ffn_mesh:
            raise Step3Error("--afd auto chooses both groups: drop --mesh/--ffn-mesh")
        if micro < 1:
            raise Step3Error(f"--micro-batches must be >= 1, got {micro}")
        from step3_jax.analysis.sizing import choose

        placement, sizing = choose(cfg, micro_batches=micro, **kw)
        log.info(f"--afd auto: {placement.describe()}")
    else:
        placement, sizing = deployment.parse_placement(args.afd, args.mesh, args.ffn_mesh,
                                                       micro), None
    if family.is_step35(cfg):
        out = plan.document(cfg, placement, **kw)
        out["compiled"] = None if args.compiled_check == "off" else {
            "skipped": "the compiled check lowers Step-3's decode programs, not Step-3.5's"}
    else:
        out = compiled.plan_document(cfg, placement, compiled=args.compiled_check,
                                     log=log.info, **kw)
    if sizing is not None:
        out["sizing"] = sizing
        out["notes"].insert(0, sizing["rule"])
    if not args.json:
        print(format_plan(out))
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_plan(doc: dict) -> str:
    """The human-readable ``step3-jax plan`` output."""
    groups = list(doc["breakdown"])
    bd = doc["breakdown"]
    from step3_jax.analysis.deployment import Placement

    placement = Placement(**_placement_fields(doc["placement"]))
    lines = [f"{doc['config']} on {placement.describe()}",
             f"batch {doc['batch']:,} at context {doc['context']:,}; weights "
             f"{doc['weights'].upper()}, KV {doc['kv_dtype'].upper()}, activations "
             f"{doc['activation_dtype'].upper()}, MoE kernel {doc['moe_kernel']}",
             ""]
    width = 14
    head = f"{'per device (GB)':<28}" + "".join(f"{g:>{width}}" for g in groups)
    lines.append(head)

    def row(label, get):
        cells = []
        for g in groups:
            v = get(bd[g])
            cells.append(f"{'-' if v is None else _gb(v):>{width}}")
        lines.append(f"{label:<28}" + "".join(cells))

    row("weights", lambda x: x["weights"]["total"])
    cats = []
    for g in groups:
        cats += [c for c in bd[g]["weights"] if c != "total" and c not in cats]
    for c in cats:
        row(f"  {c.replace('_', ' ')}", lambda x, c=c: x["weights"].get(c))
    row("KV cache", lambda x: x["kv_cache"] or None)
    row("activations (peak)", lambda x: x["activations"]["total"])
    row("total", lambda x: x["total"])
    lines.append(f"{'sequences per device':<28}" + "".join(
        f"{bd[g]['sequences_per_device'] or '-':>{width}}" for g in groups))
    mem = doc["device_memory_bytes"]
    use = ", ".join(f"{g} {100 * bd[g]['total'] / mem:.0f}%" for g in groups)
    lines += ["", f"device memory {_gb(mem)} GB: {'fits' if doc['fits'] else 'does NOT fit'} "
              f"({use} full)"]
    if "max_batch" in doc:
        lines.append(f"largest batch that fits at context {doc['context']:,}: "
                     f"{doc['max_batch']:,}")
    if doc.get("sizing"):
        s = doc["sizing"]
        lines.append(f"--afd auto chose {s['attention_servers']}A{s['ffn_servers']}F: the "
                     f"fewest servers of 8 that hold the batch (no TPOT modelled; see notes)")
    c = doc.get("compiled")
    if c is None:
        pass
    elif "skipped" in c:
        lines += ["", f"compiled check skipped: {c['skipped']}"]
    else:
        w = max(len(p["program"]) for p in c["programs"])
        lines += ["", f"compiled check ({c['devices']} emulated {c['backend']} devices, "
                      f"{c['dtype']} weights/KV/activations, {c['moe_kernel']} MoE kernel, "
                      f"{c['seconds']:.1f} s): bytes per device, compiled / plan",
                  f"{'program':<{w}}{'arguments':>22}{'ratio':>7}{'temps':>22}{'ratio':>7}"]
        for p in c["programs"]:
            comp, pl = p["compiled"], p["plan"]
            lines.append(
                f"{p['program']:<{w}}"
                f"{_gb(comp['arguments']) + ' / ' + _gb(pl['arguments']):>22}"
                f"{p['arguments_ratio']:>7.3f}"
                f"{_gb(comp['temps']) + ' / ' + _gb(pl['temps']):>22}"
                f"{p['temps_ratio']:>7.3f}")
    if doc.get("notes"):
        lines += ["", "Notes:"] + [f"  - {n}" for n in doc["notes"]]
    return "\n".join(lines)


def _placement_fields(pj: dict) -> dict:
    if pj["kind"] == "afd":
        return {"afd": True, "attention": pj["attention_devices"], "ffn_ep": pj["ffn_mesh"]["ep"],
                "ffn_tp": pj["ffn_mesh"]["tp"], "micro_batches": pj["micro_batches"]}
    return dict(pj["mesh"])