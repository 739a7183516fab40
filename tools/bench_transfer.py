"""Per-layer AFD transfer: bytes and time across JAX processes vs within one process.

One AFD layer moves, per micro-batch of T tokens, A->F the FP8 activations ``[T, H]`` with a
float32 scale per token and the top-k routing (float32 weights, int32 ids), and F->A the result
``[T, H]`` in the compute dtype (float32 here). This tool times that round trip, payload shapes
from a config (default ``step3``: H = 7168, top-3), no weights:

* within one process: ``jax.device_put`` from an attention device to an FFN device and back
  (what single-process ``--afd`` does per attention device);
* across processes: two JAX processes (``jax.distributed`` on loopback, 1 device each), the
  payload offered and pulled through ``step3_jax.runtime.transport.Transport``
  (``jax.experimental.transfer``) and the result sent back, as ``launch -- generate --afd``.

Each point is the median of ``--repeats`` sequential round trips after two warm-ups (one layer,
one micro-batch, nothing else running: the latency a layer sees, not a pipelined throughput).

    python tools/bench_transfer.py --tokens 1,16,128 [--config step3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def payload(cfg, tokens: int):
    """Host arrays of one layer's A->F payload and F->A result for ``tokens`` tokens."""
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(0)
    H, k = cfg.hidden_size, cfg.moe_top_k
    a2f = [rng.standard_normal((tokens, 1, H)).astype(ml_dtypes.float8_e4m3fn),
           rng.random((tokens, 1, 1), dtype=np.float32),
           rng.random((tokens, 1, k), dtype=np.float32),
           rng.integers(0, cfg.moe_num_experts, (tokens, 1, k), dtype=np.int32)]
    f2a = [rng.standard_normal((tokens, 1, H)).astype(np.float32)]
    return a2f, f2a


def nbytes(arrays) -> int:
    return int(sum(a.nbytes for a in arrays))


def in_process(cfg, tokens_list, repeats):
    import jax

    a_dev, f_dev = jax.devices()[:2]
    out = []
    for tokens in tokens_list:
        a2f, f2a = payload(cfg, tokens)
        a2f = [jax.device_put(x, a_dev) for x in a2f]
        f2a = [jax.device_put(x, f_dev) for x in f2a]
        jax.block_until_ready((a2f, f2a))
        times = []
        for r in range(repeats + 2):
            t = time.perf_counter()
            jax.block_until_ready([jax.device_put(x, f_dev) for x in a2f])
            jax.block_until_ready([jax.device_put(x, a_dev) for x in f2a])
            if r >= 2:
                times.append(time.perf_counter() - t)
        out.append(_point(tokens, a2f, f2a, times))
    return out


def _point(tokens, a2f, f2a, times):
    ms = 1e3 * statistics.median(times)
    b = nbytes(a2f) + nbytes(f2a)
    return {"tokens": tokens, "a2f_bytes": nbytes(a2f), "f2a_bytes": nbytes(f2a),
            "round_trip_ms": ms, "gb_per_s": b / ms / 1e6,
            "round_trip_ms_min": 1e3 * min(times)}


def cross_process(rank: int, port: int, cfg, tokens_list, repeats):
    """Rank 0 times the round trips and prints them as JSON; rank 1 echoes."""
    import jax

    from step3_jax.runtime import distributed, transport
    from step3_jax.runtime.launch import ProcessGroup

    group = ProcessGroup(f"127.0.0.1:{port}", 2, rank)
    distributed.initialize(group, 120)
    kv = transport.Kv(120, rank)
    t = transport.Transport(kv, group, 120)
    dev = jax.local_devices()[0]
    peer = 1 - rank
    out, uuid = [], 0
    for tokens in tokens_list:
        a2f, f2a = payload(cfg, tokens)
        a2f = [jax.device_put(x, dev) for x in a2f]
        f2a = [jax.device_put(x, dev) for x in f2a]
        abstract = lambda xs: [jax.ShapeDtypeStruct(x.shape, x.dtype,  # noqa: E731
                                                    sharding=jax.sharding.SingleDeviceSharding(dev))
                               for x in xs]
        times = []
        for r in range(repeats + 2):
            uuid += 2
            if rank == 0:
                start = time.perf_counter()
                t.send(uuid, a2f)
                jax.block_until_ready(t.recv(peer, uuid + 1, abstract(f2a)))
                if r >= 2:
                    times.append(time.perf_counter() - start)
            else:
                jax.block_until_ready(t.recv(peer, uuid, abstract(a2f)))
                t.send(uuid + 1, f2a)
        if rank == 0:
            out.append(_point(tokens, a2f, f2a, times))
    t.close()
    if rank == 0:
        print(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="step3", help="preset or config.json (default step3)")
    p.add_argument("--tokens", default="1,16,128",
                   help="tokens per micro-batch, comma-separated (default 1,16,128)")
    p.add_argument("--repeats", type=int, default=30, help="timed round trips (default 30)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # internal: a child
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        tokens_list = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        p.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if not tokens_list or min(tokens_list) < 1 or args.repeats < 1:
        p.error("--tokens and --repeats must be positive")
    if args.rank is not None or args.in_process:
        from step3_jax.model.config import load_config

        cfg = load_config(args.config)
        if args.in_process:
            print(json.dumps(in_process(cfg, tokens_list, args.repeats)))
        else:
            cross_process(args.rank, args.port, cfg, tokens_list, args.repeats)
        return 0

    from step3_jax.runtime.launch import child_env, free_port

    common = [sys.executable, __file__, "--config", args.config, "--tokens", args.tokens,
              "--repeats", str(args.repeats)]
    inside = json.loads(subprocess.run(common + ["--in-process"], env=child_env(2),
                                       capture_output=True, text=True, check=True).stdout)
    port = free_port()
    procs = [subprocess.Popen(common + ["--rank", str(r), "--port", str(port)],
                              env=child_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for r in range(2)]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        print(f"bench_transfer: a process failed: {[p.returncode for p in procs]}",
              file=sys.stderr)
        return 1
    across = json.loads(outs[0])
    import jax

    report = {"config": args.config, "repeats": args.repeats, "jax": jax.__version__,
              "cpu_count": os.cpu_count(), "within_process": inside, "across_processes": across}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"config {args.config}: one layer, one micro-batch, median of {args.repeats} round "
          f"trips (jax {jax.__version__}, CPU, {os.cpu_count()} cores)")
    print("| tokens | A->F bytes | F->A bytes | within one process (ms) | across processes (ms) "
          "| across / within |")
    print("|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(inside, across):
        print(f"| {a['tokens']} | {a['a2f_bytes']:,} | {a['f2a_bytes']:,} | "
              f"{a['round_trip_ms']:.3f} ({a['gb_per_s']:.2f} GB/s) | "
              f"{b['round_trip_ms']:.3f} ({b['gb_per_s']:.2f} GB/s) | "
              f"{b['round_trip_ms'] / a['round_trip_ms']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
