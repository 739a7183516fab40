"""The ``step3-jax`` command line: ``generate``, ``score`` and ``info``.

Conventions: ``--help`` on every subcommand; with ``--json`` stdout carries exactly one JSON
document and every log line or progress bar goes to stderr; a user error prints one line
``step3-jax: error: ...`` naming the culprit and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from typing import Sequence

from step3_jax.errors import Step3Error

log = logging.getLogger("step3_jax")

DEFAULT_PRESET = "tiny"


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="Hub checkpoint directory (config.json + safetensors). Without it, "
                        "--config with seeded random weights; with neither, the demo model "
                        "shipped in the package (step3_jax/demo_model, byte-level tokenizer)")
    g.add_argument("--config", metavar="PRESET|FILE",
                   help="preset name (tiny, bench, step3, demo) or config.json path, with "
                        "seeded random weights")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight and activation dtype (default float32: XLA:CPU runs bfloat16 "
                        "matmuls ~25x slower)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for random weights and for sampling (default 0)")
    g.add_argument("--moe-impl", choices=("auto", "loop", "ragged"), default="auto",
                   help="MoE expert kernel: loop (XLA:CPU), ragged (ragged_dot, GPU/TPU); "
                        "default auto picks by backend")
    g.add_argument("--mesh", metavar="dp=N,tp=N,ep=N",
                   help="shard over a device mesh: dp splits the batch (and the KV cache), tp "
                        "the heads and FFN widths, ep the experts; omitted axes are 1 "
                        "(default: one device). Emulate devices on CPU with XLA_FLAGS="
                        "--xla_force_host_platform_device_count=8")


def _afd_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("attention-FFN disaggregation")
    a.add_argument("--afd", metavar="A:F",
                   help="attention (+KV cache, router, LM head) on A devices, FFN/experts on "
                        "the next F devices; exclusive with --mesh")
    a.add_argument("--ffn-mesh", metavar="ep=N,tp=N",
                   help="how the FFN group splits the experts (default ep=F)")
    a.add_argument("--micro-batches", type=int, default=3,
                   help="micro-batches pipelined between the groups (default 3)")
    a.add_argument("--afd-transfer-dtype", default="float8_e4m3fn",
                   choices=("float8_e4m3fn", "bfloat16", "float32"),
                   help="A->F activations: FP8 e4m3 with per-token scales (default, as in the "
                        "paper) or a plain dtype; F->A results use the compute dtype")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON document on stdout (logs go to stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="step3-jax",
        description="Step-3 (MFA attention + MoE) in pure-functional JAX: generate, score, "
                    "benchmark, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate", help="generate tokens for one or more prompts (one ragged batch)",
        description="Generate continuations for a ragged batch of prompts with a jitted "
                    "on-device decode loop.")
    _model_args(gen)
    g = gen.add_argument_group("prompts")
    g.add_argument("--prompt-ids", type=_ids, action="append", default=[], metavar="1,2,3",
                   help="a prompt as comma-separated token ids; repeat for more prompts")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a text prompt (needs tokenizer.json beside the checkpoint); repeatable")
    s = gen.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="tokens to generate per prompt (default 32)")
    s.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus: keep the most likely tokens up to this mass, in (0, 1]")
    s.add_argument("--eos-id", type=int, action="append", default=None, metavar="ID",
                   help="stop token id (repeatable); default: the config's eos_token_id")
    _afd_args(gen)
    from step3_jax.runtime import launch

    launch.add_process_args(gen)
    _common(gen)

    sc = sub.add_parser(
        "score", help="log-probability of each token given its prefix",
        description="Score token ids: logprobs[i-1] = log p(ids[i] | ids[:i]) for i >= 1.")
    _model_args(sc)
    sc.add_argument("--ids", type=_ids, metavar="1,2,3,...", help="token ids to score")
    sc.add_argument("--text", help="text to score (needs tokenizer.json beside the checkpoint)")
    _afd_args(sc)
    _common(sc)

    be = sub.add_parser(
        "bench", help="decode throughput against the memory roofline measured in the same run",
        description="Benchmark decoding: the median decode step over repeated runs, the bytes "
                    "that step must read, the machine's memory bandwidth (a float32 "
                    "[1,8192]x[8192,8192] matvec, same run) and the resulting MBU.")
    _model_args(be)
    be.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    be.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    be.add_argument("--new-tokens", type=int, default=32, help="tokens per sequence (default 32)")
    be.add_argument("--repeats", type=int, default=3, help="timed runs after warm-up (default 3)")
    be.add_argument("--flush-mb", type=int, default=1024,
                    help="cache-flush buffer rewritten before each timed run (0 = off)")
    _afd_args(be)
    launch.add_process_args(be)
    _common(be)

    info = sub.add_parser(
        "info", help="parameter counts and KV-cache size of a config",
        description="Parameters (total and activated per token, from the weight declaration) "
                    "and KV-cache bytes per token.")
    info.add_argument("--config", default="step3", metavar="PRESET|FILE",
                      help="preset name or config.json path (default step3)")
    info.add_argument("--checkpoint", metavar="DIR", help="read config.json from this directory")
    _common(info)

    cost = sub.add_parser(
        "cost", help="the paper's decoding-cost model: Step-3 and eight other models",
        description="Per decoded token at a context: KV bytes, attention-core, linear and FFN "
                    "FLOPs, arithmetic intensity, and USD per 1M tokens on H800, H20, A800 and "
                    "910B, with the AFD (cheapest attention + cheapest FFN) total and the "
                    "minimum MoE sparsity per accelerator. Step-3 is read from "
                    "configs/step3.json through the weight declaration.")
    cost.add_argument("--context", type=int, default=8192, metavar="C",
                      help="context length in tokens (default 8192)")
    cost.add_argument("--plot", metavar="FILE.png",
                      help="also draw cost against activated parameters (needs matplotlib)")
    _common(cost)

    est = sub.add_parser(
        "estimate", help="roofline TPOT and tokens/GPU/s of Step-3 on an AFD deployment",
        description="A roofline model of the AFD pipeline (attention, transfer, FFN stages) "
                    "for Step-3, beside the paper's measured tokens/GPU/s. Defaults: the "
                    "paper's 2A2F setting (H800, batch 6144, context 4096).")
    est.add_argument("--hardware", default="H800", metavar="HW[:HW]",
                     help="H800, H20, A800 or 910B; ATTENTION:FFN for a mix (default H800)")
    est.add_argument("--afd", default="2:2", metavar="A:F",
                     help="attention and FFN servers of 8 accelerators, e.g. 2:2 or 2A2F "
                          "(default 2:2)")
    est.add_argument("--batch", type=int, default=6144, metavar="B",
                     help="concurrent sequences (default 6144)")
    est.add_argument("--context", type=int, default=4096, metavar="C",
                     help="context length of every sequence (default 4096)")
    est.add_argument("--micro-batches", type=int, default=3, metavar="N",
                     help="micro-batches in the A/transfer/F pipeline (default 3)")
    est.add_argument("--attention-dtype", default="fp8", metavar="fp8|bf16",
                     help="KV cache and attention GEMMs in FP8 (default) or BF16")
    est.add_argument("--config", default="step3", metavar="PRESET|FILE",
                     help="the Step-3 config to derive the model from (default step3)")
    _common(est)

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
                    help="preset name or config.json path (default step3, the full model)")
    pa = pl.add_argument_group("placement (one of; neither: one device)")
    pa.add_argument("--afd", metavar="A:F",
                    help="attention on A devices, FFN on F devices (as generate --afd), or the "
                         "paper's 2A2F: servers of 8 devices (2A2F = 16:16)")
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
                         "ep>1 compile in seconds even for the full model")
    _common(pl)

    conv = sub.add_parser(
        "convert", help="Hub safetensors (bf16 or block-FP8) -> orbax checkpoint, streaming",
        description="Convert a Hub checkpoint directory into an orbax checkpoint, one layer at "
                    "a time (host memory about one layer). Headers are validated before "
                    "anything is written; the output appears only when complete. "
                    "generate/score/bench --checkpoint accept the result and restore each "
                    "weight straight onto its sharding.")
    conv.add_argument("--hf", required=True, metavar="DIR",
                      help="Hub checkpoint directory (config.json + safetensors)")
    conv.add_argument("--out", required=True, metavar="DIR", help="output directory")
    conv.add_argument("--dtype", choices=("bfloat16", "float32", "fp8"), default="bfloat16",
                      help="stored weights: bfloat16 (default) or float32 (FP8 sources "
                           "dequantized), or fp8 (block-FP8 values + scales, kept from an FP8 "
                           "source or quantized; router, embedding, LM head, norms stay bf16)")
    conv.add_argument("--force", action="store_true",
                      help="replace a non-empty --out (only once the new one is complete)")
    _common(conv)

    exp = sub.add_parser(
        "export", help="orbax checkpoint -> Hub safetensors (sharded, with index and config)",
        description="Write an orbax checkpoint made by `convert` back in the Hub format: one "
                    "safetensors shard per layer, model.safetensors.index.json, config.json "
                    "and tokenizer files, in the stored dtype (fp8 stores as block-FP8).")
    exp.add_argument("--checkpoint", required=True, metavar="DIR", help="orbax checkpoint")
    exp.add_argument("--out", required=True, metavar="DIR", help="output Hub directory")
    exp.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _common(exp)
    launch.add_parser(sub)
    return parser


def _config(args):
    """The config alone (cheap): flags and ids are checked against it before weights load."""
    from step3_jax.checkpoint.hub import checkpoint_dir
    from step3_jax.model.config import load_config

    if args.checkpoint is None and args.config is None:
        _default_model(args)
    source = args.config if args.config is not None else checkpoint_dir(args.checkpoint)
    return load_config(source, dtype=args.dtype, moe_impl=args.moe_impl)


def _default_model(args) -> None:
    """Neither --checkpoint nor --config: the shipped demo model (or, in a checkout where it has
    not been trained, the ``tiny`` preset with random weights)."""
    from step3_jax.training import demo

    if not demo.available():
        args.config = DEFAULT_PRESET
        return
    args.checkpoint = str(demo.directory())
    rec = demo.record()
    log.info("no --checkpoint: the shipped demo model (%.1fM-parameter Step-3, byte-level, "
             "trained on Python's standard library; validation perplexity %.3f), %s",
             rec["parameters"] / 1e6, rec["validation_perplexity"], args.checkpoint)


def _afd_plan(args):
    """The AFD plan of ``--afd`` (validated before any weight loads), or None."""
    if not args.afd:
        return None
    if args.mesh:
        raise Step3Error("--afd and --mesh are exclusive (use --ffn-mesh for the FFN group)")
    from step3_jax.runtime import afd

    return afd.parse_plan(args.afd, args.ffn_mesh, args.micro_batches, args.afd_transfer_dtype)


def _load(args, plan=None):
    """The weights, each read straight onto its device(s): by ``--mesh``, or by the AFD groups."""
    from step3_jax.checkpoint.hub import load

    if args.checkpoint is None:
        log.info("no --checkpoint: config %r with seeded random weights (seed %d)", args.config,
                 args.seed)
    from step3_jax.model.sharding import parse_mesh

    placement = {}
    if plan is not None:
        from step3_jax.runtime import afd

        placement = {"shardings": afd.afd_shardings(_config(args), plan),
                     "expert_parallel": plan.ffn_ep}
    elif args.mesh:
        placement = {"mesh": parse_mesh(args.mesh)}
    return load(args.checkpoint, args.config, dtype=args.dtype, seed=args.seed,
                moe_impl=args.moe_impl, progress=not args.quiet, **placement)


def _tokenizer(args, what: str):
    from step3_jax.checkpoint.hub import load_tokenizer

    tok = load_tokenizer(args.checkpoint)
    if tok is None:
        where = args.checkpoint or f"the random-weight config {args.config!r}"
        raise Step3Error(f"{what} needs a tokenizer.json beside the checkpoint; {where} has "
                         "none (pass token ids instead)")
    return tok


def cmd_generate(args) -> dict:
    from step3_jax.runtime.generate import generate

    from step3_jax.runtime import sampling
    from step3_jax.checkpoint.hub import load_tokenizer
    from step3_jax.runtime.generate import check_prompts

    prompts = list(args.prompt_ids)
    if not prompts and not args.prompt:
        raise Step3Error("no prompt: give --prompt-ids 1,2,3 or --prompt TEXT")
    if args.max_new_tokens < 1:
        raise Step3Error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling.check(args.temperature, args.top_k, args.top_p)
    if args.mesh:
        from step3_jax.model.sharding import parse_mesh

        parse_mesh(args.mesh)  # a bad mesh fails before any weight loads
    cfg = _config(args)
    tok = _tokenizer(args, "--prompt") if args.prompt else load_tokenizer(args.checkpoint)
    prompts += [tok.encode(text).ids for text in args.prompt]
    check_prompts(prompts, cfg)
    plan = _afd_plan(args)
    from step3_jax.runtime.launch import process_group

    group = process_group(args, afd=plan is not None)
    knobs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_ids=args.eos_id)
    if group is not None:  # attention and FFN groups in separate processes
        from step3_jax.runtime import distributed

        ran = distributed.generate(args, plan, group, prompts, **knobs)
        if ran is None:  # an FFN process: the attention process (0) prints the results
            return None
        results, metrics, cfg = ran
    elif plan is not None:
        from step3_jax.runtime import afd

        params, cfg = _load(args, plan)
        results, metrics = afd.generate(afd.place(params, cfg, plan), prompts, **knobs)
    else:
        params, cfg = _load(args, plan)
        results, metrics = generate(params, cfg, prompts, **knobs)
    if tok is not None:
        for r in results:
            r.text = tok.decode(r.generated_ids)
    out = {"results": [{"prompt_ids": r.prompt_ids, "generated_ids": r.generated_ids,
                        "text": r.text, "finish_reason": r.finish_reason} for r in results],
           "metrics": {"config": cfg.name, **metrics}}
    if plan is not None:
        out["placement"] = metrics.pop("placement")
        out["afd"] = metrics.pop("afd")
    if "processes" in metrics:
        out["processes"] = metrics.pop("processes")
    if not args.json:
        texts = [None] * len(args.prompt_ids) + list(args.prompt)
        for i, r in enumerate(results):
            if texts[i] is not None and r.text is not None:  # a text prompt: show it continued
                print(f"[{i}] {texts[i]}{r.text}  ({r.finish_reason})")
                continue
            shown = r.text if r.text is not None else ",".join(map(str, r.generated_ids))
            print(f"[{i}] {','.join(map(str, r.prompt_ids))} -> {shown}  ({r.finish_reason})")
        if plan is None:
            log.info("%d tokens in %d decode steps, %.1f ms/step, compile %.1f s",
                     metrics["generated_tokens"], metrics["decode_steps"],
                     metrics["decode_step_ms"] or 0.0, metrics["compile_s"])
        else:
            log.info("AFD: attention on devices %s, FFN on %s; %d micro-batches, %d B A->F and "
                     "%d B F->A per layer", out["placement"]["attention_devices"],
                     out["placement"]["ffn_devices"], out["afd"]["micro_batches"],
                     out["afd"]["a2f_bytes_per_layer"], out["afd"]["f2a_bytes_per_layer"])
    return out


def cmd_score(args) -> dict:
    from step3_jax.runtime.generate import score

    if (args.ids is None) == (args.text is None):
        raise Step3Error("give exactly one of --ids 1,2,3 or --text TEXT")
    from step3_jax.runtime.generate import check_prompts

    cfg = _config(args)
    ids = args.ids if args.ids is not None else _tokenizer(args, "--text").encode(args.text).ids
    if len(ids) < 2:
        raise Step3Error(f"scoring needs at least 2 tokens, got {len(ids)}")
    check_prompts([ids], cfg)
    plan = _afd_plan(args)
    params, cfg = _load(args, plan)
    if plan is not None:
        from step3_jax.runtime import afd

        logprobs = afd.score(afd.place(params, cfg, plan), ids)
    else:
        logprobs = score(params, cfg, ids)
    mean = sum(logprobs) / len(logprobs)
    out = {"ids": ids, "logprobs": logprobs, "mean_logprob": mean, "perplexity": math.exp(-mean)}
    if not args.json:
        for token, lp in zip(ids[1:], logprobs):
            print(f"{token}\t{lp:.6f}")
        print(f"perplexity\t{out['perplexity']:.4f}")
    return out


def cmd_info(args) -> dict:
    from step3_jax.model.config import load_config
    from step3_jax.model.weights import count_params

    cfg = load_config(args.checkpoint or args.config)
    counts = count_params(cfg)
    kv_elems = cfg.kv_elements_per_token
    out = {
        "config": cfg.name,
        "parameters": counts["total"],
        "activated_parameters": counts["activated"],
        "layers": cfg.num_hidden_layers,
        "moe_layers": len(cfg.moe_layers),
        "dense_layers": cfg.num_hidden_layers - len(cfg.moe_layers),
        "kv_bytes_per_token": {"float32": kv_elems * 4, "bfloat16": kv_elems * 2,
                               "fp8": kv_elems},
        "vocab_size": cfg.vocab_size,
        "padded_vocab": cfg.padded_vocab,
    }
    if not args.json:
        print(f"config               {cfg.name}")
        print(f"parameters           {counts['total']:,} ({counts['total'] / 1e9:.1f}B)")
        print(f"activated / token    {counts['activated']:,} "
              f"({counts['activated'] / 1e9:.1f}B, input embedding excluded)")
        print(f"layers               {cfg.num_hidden_layers} ({out['dense_layers']} dense, "
              f"{out['moe_layers']} MoE)")
        kv = out["kv_bytes_per_token"]
        print(f"KV bytes / token     {kv['fp8']:,} (fp8)  {kv['bfloat16']:,} (bf16)  "
              f"{kv['float32']:,} (f32)")
        print(f"vocabulary           {cfg.vocab_size} (padded to {cfg.padded_vocab})")
    return out


def cmd_bench(args) -> dict:
    from step3_jax.runtime import bench

    for flag in ("batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise Step3Error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.checkpoint is None and args.config is None:
        args.config = "bench"
    cfg = _config(args)
    if args.prompt_len + args.new_tokens > cfg.max_position_embedding:
        raise Step3Error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} "
                         f"exceeds the context ({cfg.max_position_embedding})")
    plan = _afd_plan(args)
    if plan is not None and args.new_tokens < bench.AFD_MIN_NEW_TOKENS:
        raise Step3Error(f"--new-tokens must be >= {bench.AFD_MIN_NEW_TOKENS} with --afd, got "
                         f"{args.new_tokens}")
    from step3_jax.runtime.launch import process_group

    group = process_group(args, afd=plan is not None)
    run = functools.partial(bench.run, batch=args.batch, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, repeats=args.repeats,
                            flush_mb=args.flush_mb, seed=args.seed, log=log.info)
    if group is not None:  # attention and FFN groups in separate processes
        from step3_jax.runtime import distributed

        session = distributed.start(args, plan, group)
        if session.role == "ffn":  # serves until process 0, which reports, stops it
            session.serve()
            return None
        out = session.run(run, None, session.cfg, afd_model=session.model)
        out["processes"] = session.layout
    else:
        params, cfg = _load(args, plan)
        model = None
        if plan is not None:
            from step3_jax.runtime import afd

            model = afd.place(params, cfg, plan)
        out = run(params, cfg, afd_model=model)
    if not args.json:
        print(f"config {out['config']} ({out['dtype']}), batch {out['batch']}, prompt "
              f"{out['prompt_len']}, {out['new_tokens']} new tokens, mesh {out['mesh']}")
        print(f"decode step      {out['decode_step_ms']:.2f} ms  "
              f"({out['decode_tokens_per_s']:.1f} tokens/s)")
        print(f"bytes per step   {out['bytes_per_step'] / 1e9:.3f} GB")
        print(f"peak bandwidth   {out['peak_bandwidth_gbs']:.1f} GB/s (same run)")
        print(f"MBU              {100 * out['mbu']:.1f}%")
        print(f"prefill          {out['prefill_ms']:.1f} ms;  compile {out['compile_s']:.1f} s")
        if plan is not None:
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
    return out


def cmd_cost(args) -> dict:
    from step3_jax.analysis import costmodel

    out = costmodel.report(args.context)
    if args.plot:
        costmodel.plot_report(out, args.plot)
        log.info("wrote %s", args.plot)
    if not args.json:
        print(costmodel.format_report(out))
    return out


def cmd_estimate(args) -> dict:
    from step3_jax.model.config import load_config
    from step3_jax.analysis.estimate import estimate, format_estimate

    out = estimate(hardware=args.hardware, afd=args.afd, batch=args.batch, context=args.context,
                   micro_batches=args.micro_batches, attention_dtype=args.attention_dtype,
                   cfg=load_config(args.config))
    if not args.json:
        print(format_estimate(out))
    return out


def cmd_plan(args) -> dict:
    from step3_jax.analysis import plan
    from step3_jax.model.config import load_config

    if args.micro_batches is not None and not args.afd:
        raise Step3Error("--micro-batches needs --afd")
    placement = plan.parse_placement(args.afd, args.mesh, args.ffn_mesh,
                                     3 if args.micro_batches is None else args.micro_batches)
    memory = plan.parse_bytes(args.device_memory)
    out = plan.run(load_config(args.config), placement, batch=args.batch, context=args.context,
                   weights_format=args.weights, kv_dtype=args.kv_dtype, device_memory=memory,
                   compiled=args.compiled_check, log=log.info)
    if not args.json:
        print(plan.format_plan(out))
    return out


def cmd_convert(args) -> dict:
    from step3_jax.checkpoint.convert import convert

    out = convert(args.hf, args.out, weights=args.dtype, force=args.force,
                  progress=not args.quiet)
    if not args.json:
        print(f"{out['output']}: {out['weights']} weights, {out['array_bytes_written'] / 1e9:.3f} "
              f"GB of arrays ({out['bytes_on_disk'] / 1e9:.3f} GB on disk) in "
              f"{out['seconds']:.1f} s")
    return out


def cmd_export(args) -> dict:
    from step3_jax.checkpoint.convert import export

    out = export(args.checkpoint, args.out, force=args.force, progress=not args.quiet)
    if not args.json:
        print(f"{out['output']}: {out['tensors']} tensors in {out['shards']} safetensors shards "
              f"({out['bytes'] / 1e9:.3f} GB, {out['weights']})")
    return out


def cmd_launch(args) -> int:
    from step3_jax.runtime import launch

    return launch.run(args)


COMMANDS = {"generate": cmd_generate, "score": cmd_score, "info": cmd_info, "bench": cmd_bench,
            "cost": cmd_cost, "estimate": cmd_estimate, "convert": cmd_convert, "export": cmd_export,
            "plan": cmd_plan, "launch": cmd_launch}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("step3-jax: %(message)s"))
    saved = log.handlers[:], log.level, log.propagate
    log.handlers[:] = [handler]  # one handler on the current stderr, for this run only
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    try:
        out = COMMANDS[args.command](args)
    except Step3Error as e:
        print(f"step3-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("step3-jax: interrupted", file=sys.stderr)
        return 130
    finally:  # an in-process caller's logging is as it was (and not bound to our stderr)
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
    if isinstance(out, int):  # launch: the launched processes' status
        return out
    if getattr(args, "json", False) and out is not None:  # None: an FFN process prints nothing
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
