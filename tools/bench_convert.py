"""Conversion throughput and peak memory: a synthetic multi-layer Hub checkpoint -> orbax -> Hub.

Writes a synthetic Hub checkpoint (BF16 by default) of about ``--gb`` GB (hidden 1024 as in the
``bench`` preset, 16 experts of width 352, as many layers as that size needs, one safetensors
shard per layer, random weights), then runs ``step3-jax convert`` and ``step3-jax export`` on it,
each in a fresh subprocess, and reports per step: seconds, throughput (checkpoint MB / s) and the
peak resident memory of the subprocess (``ru_maxrss``), against the checkpoint size. The target:
peak RSS under half the checkpoint size at 2 GB, i.e. streaming, never the whole model.

    python tools/bench_convert.py                 # ~1 GB, table on stderr
    python tools/bench_convert.py --gb 2 --json   # one JSON document on stdout
    python tools/bench_convert.py --layers 6 --expert-width 1024 --vocab 8192 \
        --source-dtype float32                    # fat layers: ~227 MB each, 1.06 GB in all

The baseline RSS of a process that has imported JAX, orbax, tensorstore and the package (and
started JAX's CPU client) is measured too: peak minus baseline is what the conversion itself
holds, reported in units of the largest tensor (streaming means a few tensors, whatever the
layer or checkpoint size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from step3_jax.model.config import load_config
from step3_jax.model.weights import declare, is_spec

_SOURCE = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def synthetic_config(gb: float, layers: int | None = None, experts: int = 16,
                     expert_width: int = 352, vocab: int | None = None,
                     dtype: str = "bfloat16") -> dict:
    """The bench preset's shapes (hidden 1024) with ``experts`` experts of width
    ``expert_width`` (the shared expert as wide), dense first and last layers and MoE between;
    ``layers`` layers, or as many as ``gb`` needs. The default is ~4% of a 1 GB checkpoint per
    layer, the same order as one layer of the real model (1.6% of 642 GB), so the peak-memory
    figure says whether conversion streams; ``--layers 6 --experts 16 --expert-width 1024
    --source-dtype float32`` makes fat layers (~227 MB each) that a layer-at-a-time converter
    cannot hide."""
    raw = json.loads((Path(__file__).resolve().parent.parent / "configs" / "bench.json").read_text())
    raw.update(moe_num_experts=experts, moe_intermediate_size=expert_width,
               share_expert_dim=expert_width)
    if vocab is not None:
        raw["vocab_size"] = vocab
    cfg = load_config("bench").replace(moe_num_experts=experts, moe_intermediate_size=expert_width,
                                       share_expert_dim=expert_width,
                                       vocab_size=raw["vocab_size"])
    itemsize = np.dtype(_SOURCE[dtype]).itemsize

    def size(n: int) -> int:
        c = cfg.replace(num_hidden_layers=n, moe_layers=tuple(range(1, n - 1)))
        return sum(math.prod(s.hub_shape) * itemsize
                   for s in jax.tree.leaves(declare(c), is_leaf=is_spec))

    if layers is None:
        layers = 3
        while size(layers + 1) <= gb * 1e9:
            layers += 1
    raw.update(_name_or_path="bench-convert", num_hidden_layers=layers,
               moe_layers_enum=",".join(map(str, range(1, layers - 1))))
    return raw


def write_checkpoint(directory: Path, raw: dict, dtype: str = "bfloat16", seed: int = 0) -> int:
    """One shard per layer (plus embedding/head), random ``dtype`` tensors; returns bytes
    written."""
    from step3_jax.model.config import from_hub_dict

    cfg = from_hub_dict(raw)
    decl = declare(cfg)
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    groups = [[decl.embed], *[jax.tree.leaves(layer, is_leaf=is_spec) for layer in decl.layers],
              [decl.final_norm, decl.lm_head]]
    weight_map, total = {}, 0
    for i, specs in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {s.hub: (rng.standard_normal(s.hub_shape, np.float32) * 0.02).astype(
            _SOURCE[dtype]) for s in specs}
        save_file(tensors, str(directory / file))
        weight_map.update({name: file for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _largest_tensor(raw: dict, dtype: str) -> int:
    """Bytes of the checkpoint's largest tensor."""
    from step3_jax.model.config import from_hub_dict

    itemsize = np.dtype(_SOURCE[dtype]).itemsize
    return max(math.prod(s.hub_shape) * itemsize
               for s in jax.tree.leaves(declare(from_hub_dict(raw)), is_leaf=is_spec))


# What every conversion process holds before it reads a byte: Python, JAX with its CPU client,
# orbax and tensorstore, and the package.
BASELINE = ("import jax, jax.numpy as jnp, orbax.checkpoint, step3_jax.checkpoint.convert; "
            "jnp.zeros(1).block_until_ready()")


def run_measured(argv: list[str]) -> dict:
    """Run ``argv`` in a fresh process; its wall time and peak RSS (Linux ru_maxrss is in KiB)."""
    code = ("import resource, subprocess, sys, time, json\n"
            "t = time.perf_counter(); r = subprocess.run(sys.argv[1:])\n"
            "s = time.perf_counter() - t\n"
            "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': r.returncode, 'seconds': s, 'peak_rss': ru.ru_maxrss * 1024}))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"bench_convert: {' '.join(argv)} failed")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"bench_convert: {' '.join(argv)} exited {result['rc']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0,
                        help="synthetic checkpoint size in GB (default 1)")
    parser.add_argument("--layers", type=int,
                        help="number of layers (default: as many as --gb needs; then --gb is "
                             "ignored)")
    parser.add_argument("--experts", type=int, default=16, help="experts per MoE layer (16)")
    parser.add_argument("--expert-width", type=int, default=352,
                        help="expert (and shared expert) width (default 352)")
    parser.add_argument("--vocab", type=int, help="vocabulary (default bench's 32000)")
    parser.add_argument("--source-dtype", default="bfloat16", choices=tuple(_SOURCE),
                        help="the synthetic checkpoint's dtype (default bfloat16)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "fp8"),
                        help="convert's stored dtype (default bfloat16)")
    parser.add_argument("--workdir", help="where to write (default: a temporary directory, "
                                          "removed afterwards)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert-"))
    cli = [sys.executable, "-m", "step3_jax.cli"]
    try:
        raw = synthetic_config(args.gb, args.layers, args.experts, args.expert_width,
                               args.vocab, args.source_dtype)
        print(f"writing a synthetic {raw['num_hidden_layers']}-layer checkpoint ...",
              file=sys.stderr)
        size = write_checkpoint(work / "hub", raw, args.source_dtype)
        baseline = run_measured([sys.executable, "-c", BASELINE])
        convert = run_measured(cli + ["convert", "--hf", str(work / "hub"), "--out",
                                      str(work / "orbax"), "--dtype", args.dtype, "-q"])
        export = run_measured(cli + ["export", "--checkpoint", str(work / "orbax"), "--out",
                                     str(work / "back"), "-q"])
        layer = max(p.stat().st_size for p in (work / "hub").glob("*.safetensors"))
        on_disk = sum(f.stat().st_size for f in (work / "orbax").rglob("*") if f.is_file())
        tensor = _largest_tensor(raw, args.source_dtype)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    def step(r: dict) -> dict:
        held = r["peak_rss"] - baseline["peak_rss"]
        return {"seconds": round(r["seconds"], 2), "mb_per_s": round(size / 1e6 / r["seconds"], 1),
                "peak_rss_bytes": r["peak_rss"], "peak_rss_fraction": round(r["peak_rss"] / size, 3),
                "held_bytes": held, "held_in_largest_layers": round(held / layer, 2),
                "held_in_largest_tensors": round(held / tensor, 2)}

    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "layers": raw["num_hidden_layers"], "checkpoint_bytes": size,
           "largest_shard_bytes": layer, "largest_tensor_bytes": tensor,
           "source_dtype": args.source_dtype, "stored_dtype": args.dtype,
           "baseline_rss_bytes": baseline["peak_rss"], "store_bytes_on_disk": on_disk,
           "convert": step(convert), "export": step(export)}
    if args.json:
        print(json.dumps(out))
    else:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        print(f"checkpoint {gb(size)} {args.source_dtype}, {out['layers']} layers (largest "
              f"shard {gb(layer)}, largest tensor {gb(tensor)}); baseline process RSS "
              f"{gb(baseline['peak_rss'])}", file=sys.stderr)
        for name in ("convert", "export"):
            s = out[name]
            print(f"{name:8s} {s['seconds']:7.1f} s  {s['mb_per_s']:7.1f} MB/s  peak RSS "
                  f"{gb(s['peak_rss_bytes'])} = {100 * s['peak_rss_fraction']:.0f}% of the "
                  f"checkpoint; above baseline {gb(s['held_bytes'])} = "
                  f"{s['held_in_largest_layers']:.1f} x the largest layer, "
                  f"{s['held_in_largest_tensors']:.1f} x the largest tensor", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
