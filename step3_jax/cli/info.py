"""``step3-jax info``: parameter counts and KV-cache bytes of a config, from the weight
declaration (Step-3) or the spec's tensor table (Step-3.5, :mod:`step3_jax.analysis.step35`)."""

from __future__ import annotations

import argparse

from step3_jax.cli import common


def add_parser(sub) -> argparse.ArgumentParser:
    info = sub.add_parser(
        "info", help="parameter counts and KV-cache size of a config",
        description="Parameters (total and activated per token, from the weight declaration) "
                    "and KV-cache bytes per token. A Step-3.5-family config (step35-flash, "
                    "step35-bench, step35-tiny) also gives the sliding window's KV, the KV per "
                    "sequence at 8K and 32K, attention arithmetic intensity and MoE sparsity.")
    info.add_argument("--config", default="step3", metavar="PRESET|FILE",
                      help="preset name or config.json path (default step3)")
    info.add_argument("--checkpoint", metavar="DIR", help="read config.json from this directory")
    common.output_args(info)
    return info


def run(args) -> dict:
    from step3_jax.model.step35_config import Step35Config
    from step3_jax.model.step35_reader import load_any_config

    cfg = load_any_config(args.checkpoint or args.config)
    if isinstance(cfg, Step35Config):
        from step3_jax.analysis import step35

        out = step35.info(cfg)
        if not args.json:
            print(step35.format_info(out))
        return out
    from step3_jax.model.weights import count_params

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
