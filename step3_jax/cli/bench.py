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
    o = be.add_argument_group(
        "offline throughput",
        "--requests N benchmarks the continuous-batching engine instead: N seeded random "
        "requests, all queued at once, run to completion twice (a warm-up that compiles, then "
        "the timed run); reports output tokens/s, wall time, "
        "time to first token, time per output token, the longest inter-token gap and the KV "
        "bytes held (tools/bench_engine.py compares it with the static batch)")
    o.add_argument("--requests", type=int, metavar="N", help="requests in the mix")
    o.add_argument("--prompt-lens", type=_range, default=(128, 1024), metavar="MIN:MAX",
                   help="prompt lengths, uniform (default 128:1024)")
    o.add_argument("--output-lens", type=_range, default=(16, 128), metavar="MIN:MAX",
                   help="output budgets, uniform (default 16:128)")
    common.engine_args(be, "--requests")
    common.afd_args(be)
    launch.add_process_args(be)
    common.output_args(be)
    return be


def _range(text: str) -> tuple[int, int]:
    """``MIN:MAX`` (an argparse type)."""
    lo, sep, hi = text.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(lo), int(hi)


def offline(args) -> dict:
    """``bench --requests``: the engine's offline throughput over a seeded request mix."""
    from step3_jax.runtime.bench import cpu_model, loadavg
    from step3_jax.runtime.engine_setup import generate_requests, request_mix

    if args.requests < 1:
        raise Step3Error(f"--requests must be >= 1, got {args.requests}")
    common.check_engine_flags(args)
    if args.checkpoint is None and args.config is None:
        args.config = DEFAULT_PRESET
    cfg = common.config(args)
    common.refuse_engine(cfg)
    plan = common.afd_plan(args)
    if args.num_processes is not None:
        raise Step3Error("bench --requests runs in one process (--afd without --num-processes)")
    common.check_memory(args, cfg, plan, batch=min(args.requests, args.max_num_seqs or 8),
                        longest=args.prompt_lens[1], new_tokens=args.output_lens[1])
    prompts, budgets = request_mix(args.requests, args.prompt_lens, args.output_lens,
                                   cfg.vocab_size, seed=args.seed)
    params, cfg = common.load(args, plan)
    model = None
    if plan is not None:
        from step3_jax.runtime import afd

        model = afd.place(params, cfg, plan)
    engine = common.engine(args, params, cfg, model)
    log.info("%d requests: prompts %d-%d tokens (%d in all), budgets %d-%d (%d in all)",
             args.requests, *args.prompt_lens, sum(map(len, prompts)), *args.output_lens,
             sum(budgets))
    log.info("warm-up: the mix once, compiling every program it needs")
    _, warm = generate_requests(engine, prompts, max_new_tokens=budgets, eos_ids=[-1])
    for rid in list(engine.requests):
        engine.forget(rid)
    engine.reset_stats()
    log.info("timed run")
    _, metrics = generate_requests(engine, prompts, max_new_tokens=budgets, eos_ids=[-1])
    metrics["compile_s"] = round(warm["compile_s"] + metrics["compile_s"], 3)
    out = {"config": cfg.name, "dtype": cfg.dtype, "mode": "offline",
           "prompt_lens": list(args.prompt_lens), "output_lens": list(args.output_lens),
           "prompt_tokens": sum(map(len, prompts)), "cpu": cpu_model(), "loadavg": loadavg(),
           **metrics}
    if not args.json:
        print(f"config {cfg.name} ({cfg.dtype}), {out['requests']} requests, prompts "
              f"{args.prompt_lens[0]}-{args.prompt_lens[1]}, outputs {args.output_lens[0]}-"
              f"{args.output_lens[1]}, at most {out['max_num_seqs']} at once")
        print(f"throughput       {out['output_tokens_per_s']:.1f} output tokens/s "
              f"({out['generated_tokens']} tokens in {out['wall_s']:.1f} s; compiling "
              f"{out['compile_s']:.1f} s in the warm-up run)")
        print(f"latency          TTFT {out['ttft_ms_mean']:.0f} ms mean, TPOT "
              f"{out['tpot_ms_p50']:.1f} / {out['tpot_ms_p90']:.1f} ms p50 / p90, longest "
              f"inter-token gap {out['itl_ms_max']:.0f} ms")
        print(f"KV cache         peak {out['peak_pages_used']} of {out['pages_total']} pages of "
              f"{out['page_size']} tokens ({out['kv_bytes_peak'] / 1e6:.1f} MB); "
              f"{out['preemptions']} preemptions")
    return out


def run(args) -> dict | None:
    from step3_jax.model import family
    from step3_jax.runtime import bench
    from step3_jax.runtime.generate import check_prefill_chunk
    from step3_jax.runtime.launch import process_group

    if args.requests is not None:
        return offline(args)
    if common.uses_engine(args):
        raise Step3Error("--max-num-seqs, --page-size, --num-pages and --decode-steps go with "
                         "--requests (the offline-throughput mode)")

    for flag in ("batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise Step3Error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_prefill_chunk(args.prefill_chunk)
    if args.checkpoint is None and args.config is None:
        args.config = DEFAULT_PRESET
    cfg = common.config(args)
    if family.is_step35(cfg):  # runtime/bench.py's bytes-per-step model is Step-3's
        raise Step3Error(f"config {cfg.name!r} is a Step-3.5 model: bench measures Step-3 "
                         "only; time Step-3.5 with generate (its metrics give the step time)")
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
