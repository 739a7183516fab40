"""``step3-jax generate``: continuations of a ragged batch of prompts (one device, a mesh, AFD in
one process, or AFD across processes)."""

from __future__ import annotations

import argparse

from step3_jax.cli import common, launch
from step3_jax.cli.common import log
from step3_jax.errors import Step3Error


def add_parser(sub) -> argparse.ArgumentParser:
    gen = sub.add_parser(
        "generate", help="generate tokens for one or more prompts (one ragged batch)",
        description="Generate continuations for a ragged batch of prompts with a jitted "
                    "on-device decode loop.")
    common.model_args(gen)
    g = gen.add_argument_group("prompts")
    g.add_argument("--prompt-ids", type=common.ids, action="append", default=[],
                   metavar="1,2,3",
                   help="a prompt as comma-separated token ids; repeat for more prompts")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a text prompt (needs tokenizer.json beside the checkpoint); repeatable")
    g.add_argument("--prompt-ids-file", action="append", default=[], metavar="FILE",
                   help="a prompt as token ids in a file, separated by commas and/or "
                        "whitespace (- reads standard input); repeatable")
    g.add_argument("--prompt-file", action="append", default=[], metavar="FILE",
                   help="a text prompt read from a file (- reads standard input; needs "
                        "tokenizer.json beside the checkpoint); repeatable")
    common.prefill_args(g)
    s = gen.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="tokens to generate per prompt (default 32)")
    s.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus: keep the most likely tokens up to this mass, in (0, 1]")
    s.add_argument("--eos-id", type=int, action="append", default=None, metavar="ID",
                   help="stop token id (repeatable; -1 alone: none, decode to the budget); "
                        "default: the config's eos_token_id")
    common.engine_args(gen, "the prompts (results still in prompt order)")
    common.afd_args(gen)
    launch.add_process_args(gen)
    common.output_args(gen)
    return gen


def run(args) -> dict | None:
    from step3_jax.checkpoint.loader import load_tokenizer
    from step3_jax.runtime import sampling
    from step3_jax.runtime.generate import (check_eos, check_prefill_chunk, check_prompts,
                                            generate)
    from step3_jax.runtime.launch import process_group

    common.check_stdin_once(args.prompt_ids_file, args.prompt_file)
    prompts = list(args.prompt_ids)
    prompts += [common.read_ids_file(f, "--prompt-ids-file") for f in args.prompt_ids_file]
    texts = list(args.prompt) + [common.read_text_file(f, "--prompt-file")
                                 for f in args.prompt_file]
    if not prompts and not texts:
        raise Step3Error("no prompt: give --prompt-ids 1,2,3, --prompt TEXT, --prompt-ids-file "
                         "FILE or --prompt-file FILE")
    if args.max_new_tokens < 1:
        raise Step3Error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling.check(args.temperature, args.top_k, args.top_p)
    if args.mesh:
        from step3_jax.model.sharding import parse_mesh

        parse_mesh(args.mesh)  # a bad mesh fails before any weight loads
    cfg = common.config(args)
    common.refuse_step3_only(args, cfg)
    tok = (common.tokenizer(args, "--prompt" if args.prompt else "--prompt-file") if texts
           else load_tokenizer(args.checkpoint))
    prompts += [tok.encode(text).ids for text in texts]
    check_prompts(prompts, cfg)
    check_eos(args.eos_id, cfg)
    plan = common.afd_plan(args)
    group = process_group(args, afd=plan is not None)
    knobs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_ids=args.eos_id)
    check_prefill_chunk(args.prefill_chunk)
    common.check_engine_flags(args)
    engine = common.uses_engine(args)
    if engine and group is not None:
        raise Step3Error("the continuous-batching engine (--max-num-seqs, --page-size, "
                         "--num-pages, --decode-steps) does not run across processes yet; "
                         "use --afd in one process")
    if group is None:  # a multi-process run: each process holds a part (not checked here)
        common.check_memory(args, cfg, plan, batch=min(len(prompts), args.max_num_seqs or
                                                       len(prompts)),
                            longest=max(len(p) for p in prompts), new_tokens=args.max_new_tokens)
    if group is not None:  # attention and FFN groups in separate processes
        from step3_jax.runtime import distributed

        ran = distributed.generate(args, plan, group, prompts, **knobs)
        if ran is None:  # an FFN process: the attention process (0) prints the results
            return None
        results, metrics, cfg = ran
    elif engine:
        from step3_jax.runtime.engine_setup import generate_requests

        params, cfg = common.load(args, plan)
        model = None
        if plan is not None:
            from step3_jax.runtime import afd

            model = afd.place(params, cfg, plan)
        results, metrics = generate_requests(common.engine(args, params, cfg, model), prompts,
                                             **knobs)
        metrics = {"engine": True, **metrics}
    elif plan is not None:
        from step3_jax.runtime import afd

        params, cfg = common.load(args, plan)
        results, metrics = afd.generate(afd.place(params, cfg, plan), prompts, **knobs)
    else:
        params, cfg = common.load(args, plan)
        results, metrics = generate(params, cfg, prompts, prefill_chunk=args.prefill_chunk,
                                    **knobs)
    if tok is not None:
        for r in results:
            r.text = tok.decode(r.generated_ids)
    # Every runtime's metrics share one schema (runtime/metrics.py); AFD's placement and stage
    # metrics, and the process layout, go beside them, once.
    beside = {k: metrics.pop(k) for k in ("placement", "afd", "processes") if k in metrics}
    out = {"results": [{"prompt_ids": r.prompt_ids, "generated_ids": r.generated_ids,
                        "text": r.text, "finish_reason": r.finish_reason} for r in results],
           "metrics": {"config": cfg.name, **metrics}, **beside}
    if not args.json:
        _print(args, results, metrics, out, plan)
    return out


def _print(args, results, metrics, out, plan) -> None:
    # Each prompt as given: inline ids, id files, inline text (shown continued), text files.
    given = ([None] * len(args.prompt_ids) + [f"<{f}>" for f in args.prompt_ids_file]
             + list(args.prompt) + [f"<{f}>" for f in args.prompt_file])
    inline_text = range(len(args.prompt_ids) + len(args.prompt_ids_file),
                        len(given) - len(args.prompt_file))
    for i, r in enumerate(results):
        if i in inline_text and r.text is not None:  # a text prompt: show it continued
            print(f"[{i}] {given[i]}{r.text}  ({r.finish_reason})")
            continue
        shown = r.text if r.text is not None else ",".join(map(str, r.generated_ids))
        prompt = given[i] or ",".join(map(str, r.prompt_ids))
        if given[i] is not None:
            prompt += f" ({len(r.prompt_ids):,} tokens)"
        print(f"[{i}] {prompt} -> {shown}  ({r.finish_reason})")
    if metrics.get("engine"):
        log.info("engine: %d requests, at most %d at once; %d tokens in %.2f s (%.1f tokens/s "
                 "after %.1f s compiling); peak %d of %d pages of %d tokens; %d preemptions",
                 metrics["requests"], metrics["max_num_seqs"], metrics["generated_tokens"],
                 metrics["wall_s"], metrics["output_tokens_per_s"], metrics["compile_s"],
                 metrics["peak_pages_used"], metrics["pages_total"], metrics["page_size"],
                 metrics["preemptions"])
        return
    log.info("%d tokens in %d decode steps, %.1f ms/step, compile %.1f s",
             metrics["generated_tokens"], metrics["decode_steps"],
             metrics["decode_step_ms"] or 0.0, metrics["compile_s"])
    if plan is not None:
        log.info("AFD: attention on devices %s, FFN on %s; %d micro-batches, %d B A->F and "
                 "%d B F->A per layer", out["placement"]["attention_devices"],
                 out["placement"]["ffn_devices"], out["afd"]["micro_batches"],
                 out["afd"]["a2f_bytes_per_layer"], out["afd"]["f2a_bytes_per_layer"])
