"""``step3-jax bench``: decode throughput against the memory roofline measured in the same run
(:mod:`step3_jax.runtime.bench`)."""

from __future__ import annotations

import argparse
import functools

from step3_jax.cli import common, launch
from step3_jax.cli.common import log
from step3_jax.errors import Step3Error

DEFAULT_PRESET = "bench"  # without --checkpoint and --config: a model worth benchmarking


def add_parser(sub) -> argparse.ArgumentParser:
    be = sub.add_parser(
        "bench", help="decode throughput against the memory roofline measured in the same run",
        description="Benchmark decoding: the median decode step over repeated runs, the bytes "
                    "that step must read, the machine's memory bandwidth (a float32 "
                    "[1,8192]x[8192,8192] matvec, same run) and the resulting MBU.")
    common.model_args(be, neither=f"the {DEFAULT_PRESET!r} preset with seeded random weights")
    be.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    be.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    be.add_argument("--new-tokens", type=int, default=32, help="tokens per sequence (default 32)")
    be.add_argument("--repeats", type=int, default=3, help="timed runs after warm-up (default 3)")
    be.add_argument("--flush-mb", type=int, default=1024,
                    help="cache-flush buffer rewritten before each timed run (0 = off)")
    common.prefill_args(be)
    common.afd_args(be)
    launch.add_process_args(be)
    common.output_args(be)
    return be


def run(args) -> dict | None:
    from step3_jax.runtime import bench
    from step3_jax.runtime.generate import check_prefill_chunk
    from step3_jax.runtime.launch import process_group

    for flag in ("batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise Step3Error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_prefill_chunk(args.prefill_chunk)
    if args.checkpoint is None and args.config is None:
        args.config = DEFAULT_PRESET
    cfg = common.config(args)
    if args.prompt_len + args.new_tokens > cfg.max_position_embedding:
        raise Step3Error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} "
                         f"exceeds the context ({cfg.max_position_embedding})")
    plan = common.afd_plan(args)
    if plan is not None and args.new_tokens < bench.AFD_MIN_NEW_TOKENS:
        raise Step3Error(f"--new-tokens must be >= {bench.AFD_MIN_NEW_TOKENS} with --afd, got "
                         f"{args.new_tokens}")
    group = process_group(args, afd=plan is not None)
    if group is None:
        common.check_memory(args, cfg, plan, batch=args.batch, longest=args.prompt_len,
                            new_tokens=args.new_tokens)
    measure = functools.partial(bench.run, batch=args.batch, prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens, repeats=args.repeats,
                                flush_mb=args.flush_mb, seed=args.seed, log=log.info,
                                prefill_chunk=args.prefill_chunk)
    if group is not None:  # attention and FFN groups in separate processes
        from step3_jax.runtime import distributed

        session = distributed.start(args, plan, group)
        if session.role == "ffn":  # serves until process 0, which reports, stops it
            session.serve()
            return None
        out = session.run(measure, None, session.cfg, afd_model=session.model)
        out["processes"] = session.layout
    else:
        params, cfg = common.load(args, plan)
        model = None
        if plan is not None:
            from step3_jax.runtime import afd

            model = afd.place(params, cfg, plan)
        out = measure(params, cfg, afd_model=model)
    if not args.json:
        _print(out, plan)
    return out


def _print(out: dict, plan) -> None:
    print(f"config {out['config']} ({out['dtype']}), batch {out['batch']}, prompt "
          f"{out['prompt_len']}, {out['new_tokens']} new tokens, mesh {out['mesh']}")
    print(f"decode step      {out['decode_step_ms']:.2f} ms  "
          f"({out['decode_tokens_per_s']:.1f} tokens/s)")
    print(f"bytes per step   {out['bytes_per_step'] / 1e9:.3f} GB")
    print(f"peak bandwidth   {out['peak_bandwidth_gbs']:.1f} GB/s (same run)")
    flag = "  (over 100%: not a valid figure, see the warning)" if out["mbu_over_1"] else ""
    print(f"MBU              {100 * out['mbu']:.1f}%{flag}")
    print(f"last-level cache {_cache(out)}")
    print(f"prefill          {out['prefill_ms']:.1f} ms;  compile {out['compile_s']:.1f} s")
    if plan is None:
        return
    a = out["afd"]
    print(f"AFD              attention on devices {out['placement']['attention_devices']}"
          f", FFN on {out['placement']['ffn_devices']}; {a['micro_batches']} "
          f"micro-batches; {a['a2f_bytes_per_layer']} B A->F, "
          f"{a['f2a_bytes_per_layer']} B F->A per layer")
    if a.get("timeline_source"):
        print(f"per layer        attention {a['attention_ms_per_layer']:.2f} ms, FFN "
              f"{a['ffn_ms_per_layer']:.2f} ms, transfer "
              f"{a['transfer_ms_per_layer']:.2f} ms; bubble {a['bubble_fraction']:.2f}, "
              f"groups overlapping {a['overlap_ms']:.1f} ms of a "
              f"{a['step_ms']:.1f} ms step ({a['timeline_source']})")


def _cache(out: dict) -> str:
    """The CPU's last-level cache and whether a decode step's bytes fit in it."""
    if out["cache_bytes"] is None:
        return "unknown"
    fits = "fit in it" if out["fits_in_cache"] else "do not fit"
    return f"{out['cache_bytes'] / 1e6:.1f} MB (a step's bytes {fits})"
