#!/usr/bin/env python
"""Our Step-3.5 decoder against transformers' native implementation (``transformers.models.
step3p7``, transformers >= 5.16) on a small random model saved in the Hub layout.

1. A random model of the given config (default the ``step35-tiny`` preset) is written as a Hub
   checkpoint: ``model.safetensors`` with StepFun's tensor names and shapes (``moe.gate_proj``
   ``[E, Fe, H]``, ``moe.router_bias``, ``share_expert.*``; from ``step35_weights.declare`` via
   ``checkpoint.hub.leaf_to_hub``) and a ``config.json`` in StepFun's spelling. Our
   ``init_params`` leaves the norm weights and the router bias at zero; here they are drawn
   (0.1 and 0.3 standard normals) so that the zero-centred ``1 + w`` and the bias-only-chooses
   rule are exercised.
2. transformers reads it with ``AutoModelForImageTextToText`` (float32, eager attention). It has
   no text-only model class for this family: a bare ``model_type: step3p5`` config reads as a
   ``Step3p7TextConfig`` but no ``AutoModelForCausalLM`` accepts it, and ``Step3p7TextModel``
   alone does not rename the ``moe.*`` tensors. So the config is written as Step-3.7's wrapper
   (``model_type: step3p7``, the text config under ``text_config``) with a one-layer vision
   tower that transformers initializes randomly and text never runs; the wrapper's conversion
   mapping renames ``moe.gate`` -> ``mlp.gate``, ``router_bias`` ->
   ``mlp.gate.e_score_correction_bias``, ``moe.{gate,up}_proj`` -> ``mlp.experts.gate_up_proj``
   (concatenated, gate first), ``share_expert`` -> ``mlp.shared_experts``, and ignores the MTP
   layers' tensors (the checkpoint carries some, NaN-filled, for both readers to skip).
3. Both run the same prompts: full-forward logits (max |difference| relative to the largest
   |logit|, and the argmax agreement), and greedy decoding (transformers' ``generate`` with its
   sliding-window cache against a loop over our ``step35.forward`` with our ring-buffer cache).

    pip install -e '.[hf]'
    python tools/compare_transformers_step35.py                       # step35-tiny as shipped
    python tools/compare_transformers_step35.py --no-rope-scaling --tokens 64 --decode 32
    python tools/compare_transformers_step35.py --config my_config.json --keep /tmp/ckpt

Differences transformers documents and the model written here avoids: it reads one RoPE theta
and rotary fraction per layer *type* (the first layer of each type), applies ``rope_scaling`` to
full-attention layers only (ignoring ``yarn_only_types``), ignores ``use_rope_layers`` (RoPE on
every layer) and ``norm_expert_weight`` (always renormalizes); the config is checked against
those before anything runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from step3_jax.checkpoint.hub import leaf_to_hub
from step3_jax.checkpoint.loader import load
from step3_jax.errors import ConfigError, Step3Error
from step3_jax.model import step35
from step3_jax.model.config import read_config_source, step35_model_type
from step3_jax.model.step35_config import FULL, SLIDING, Step35Config
from step3_jax.model.step35_reader import from_step35_dict
from step3_jax.model.step35_weights import declare, is_spec

MIN_TRANSFORMERS = "5.16"
# The smallest vision tower Step3p7Config builds (one layer, a 2x2 patch grid): the wrapper needs
# one, transformers initializes it randomly (its tensors are absent), text never runs it.
TINY_VISION = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 28, "patch_size": 14, "max_position_embeddings": 4}
NORM_STD, ROUTER_BIAS_STD = 0.1, 0.3


# ----- the checkpoint ---------------------------------------------------------------------------

def check_comparable(cfg: Step35Config) -> None:
    """Refuse a config whose meaning transformers reads differently (see the module docstring)."""
    for kind in (FULL, SLIDING):
        layers = [cfg.layer(i) for i in range(cfg.num_hidden_layers) if cfg.layer_types[i] == kind]
        if len({(s.rope_theta, s.rotary_dim) for s in layers}) > 1:
            raise ConfigError(f"{cfg.name}: {kind} layers differ in RoPE theta or rotary width; "
                              "transformers reads one per layer type")
        if kind == SLIDING and any(s.rope_scaling is not None for s in layers):
            raise ConfigError(f"{cfg.name}: rope_scaling on sliding layers; transformers "
                              "scales full-attention layers only")
    if not all(cfg.use_rope):
        raise ConfigError(f"{cfg.name}: use_rope_layers switches RoPE off on some layers; "
                          "transformers ignores it")
    if cfg.moe_layers and not (cfg.norm_expert_weight and cfg.use_moe_router_bias):
        raise ConfigError(f"{cfg.name}: norm_expert_weight and use_moe_router_bias must be true "
                          "(transformers always renormalizes and always has the bias)")


def random_hub_state(cfg: Step35Config, seed: int) -> dict[str, np.ndarray]:
    """Hub-named float32 tensors for every declared weight (``step35_weights.declare``), made in
    the declared layout and turned into the Hub one by ``checkpoint.hub.leaf_to_hub``: matrices
    ``N(0, (scale / sqrt(fan_in))^2)`` as ``init_params`` draws them (so pre-activations are of
    unit scale and the tiny preset's clamps bind), norm weights ``N(0, NORM_STD^2)`` and the
    router bias ``N(0, ROUTER_BIAS_STD^2)`` where ``init_params`` leaves zeros. NumPy draws: no
    compiled generator to wait for."""
    rng = np.random.default_rng(seed)
    state = {}
    for spec in jax.tree.leaves(declare(cfg), is_leaf=is_spec):
        if spec.init == "zeros":
            std = ROUTER_BIAS_STD if spec.hub.endswith("router_bias") else NORM_STD
        else:
            std = spec.scale / np.sqrt(spec.fan_in)
        arr = (std * rng.standard_normal(spec.shape)).astype(np.float32)
        state[spec.hub] = leaf_to_hub(arr, spec, cfg)  # drops the vocabulary's padding rows
    return state


def write_checkpoint(directory: str | Path, text: dict, seed: int = 0) -> Step35Config:
    """A random model of the Hub text config ``text`` (a bare ``step3p5`` dict) in ``directory``:
    ``config.json`` as a ``step3p7`` wrapper and one ``model.safetensors``. Returns its config."""
    cfg = from_step35_dict(text, name=str(text.get("_name_or_path", "step3p5")))
    check_comparable(cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = {"model_type": "step3p7", "text_config": text, "vision_config": TINY_VISION}
    (directory / "config.json").write_text(json.dumps(wrapper, indent=1) + "\n")
    state = {**random_hub_state(cfg, seed), **mtp_stand_ins(cfg)}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return cfg


def mtp_stand_ins(cfg: Step35Config) -> dict[str, np.ndarray]:
    """Some of the tensors of the ``num_nextn_predict_layers`` MTP layers after the trunk
    (``model.layers.{L + j}``: ``enorm``, ``hnorm``, ``eh_proj``, ``transformer.shared_head``;
    spec §3), as a Hub checkpoint carries them: both readers must skip them. Filled with NaN, so
    that one read by mistake cannot pass unnoticed."""
    H, state = cfg.hidden_size, {}
    for j in range(cfg.num_nextn_predict_layers):
        lay = f"model.layers.{cfg.num_hidden_layers + j}"
        for name, shape in (("enorm.weight", (H,)), ("hnorm.weight", (H,)),
                            ("eh_proj.weight", (H, 2 * H)),
                            ("transformer.shared_head.norm.weight", (H,))):
            state[f"{lay}.{name}"] = np.full(shape, np.nan, np.float32)
    return state


def text_config(spec: str, *, rope_scaling="keep") -> dict:
    """The bare Hub text config of a preset name or ``config.json`` (a ``step3p7`` wrapper's
    ``text_config``), its ``rope_scaling`` kept, dropped (None) or replaced (a dict)."""
    raw, where, preset = read_config_source(spec)
    if step35_model_type(raw) is None:
        raise ConfigError(f"{where}: model_type {raw.get('model_type')!r} is not a Step-3.5 "
                          "config (step3p5, or step3p7 with a text_config)")
    text = copy.deepcopy(raw.get("text_config", raw))
    text.pop("_comment", None)
    if preset is not None:
        text["_name_or_path"] = preset
    if rope_scaling is None:
        text.pop("rope_scaling", None)
        text.pop("yarn_only_types", None)
    elif rope_scaling != "keep":
        text["rope_scaling"] = rope_scaling
    return text


# ----- the two models -----------------------------------------------------------------------------

def load_ours(directory: str | Path):
    """``(cfg, params)`` read back from the checkpoint directory by the library's loader (the
    ``step3p7`` wrapper's ``text_config``, header checks, the MTP tensors skipped), float32."""
    params, cfg = load(directory, dtype="float32", progress=False)
    return cfg, params


def load_transformers(directory: str | Path):
    """transformers' model of the checkpoint (float32, eager attention, eval mode). Fails if a
    text tensor is missing or left over (only the vision tower may be absent)."""
    import torch
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise Step3Error(f"transformers {transformers.__version__} has no step3p7 model "
                         f"(needs >= {MIN_TRANSFORMERS})")
    transformers.logging.set_verbosity_error()  # the vision tower's absence is expected
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation="eager",
        output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"]
                     if not k.startswith(("model.vision_model.", "model.multi_modal_projector.")))
    bad = missing + sorted(info["unexpected_keys"]) + sorted(map(str, info["mismatched_keys"]))
    if bad:
        raise Step3Error(f"{directory}: transformers did not map every text tensor: {bad[:4]}")
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


_forward = jax.jit(step35.forward, static_argnums=(3,))


def our_logits(params, cfg: Step35Config, tokens: np.ndarray) -> np.ndarray:
    """Full causal forward from position 0 (no cache), the vocabulary's padding cut off."""
    logits, _ = _forward(params, jnp.asarray(tokens, jnp.int32), None, cfg)
    return np.asarray(logits)[..., :cfg.vocab_size]


def hf_greedy(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """``[B, new_tokens]`` greedy continuations (transformers' ``generate`` and cache; no EOS)."""
    import torch

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(np.asarray(prompts)), do_sample=False,
                             max_new_tokens=new_tokens)
    return out[:, prompts.shape[1]:].numpy()


def our_greedy(params, cfg: Step35Config, prompts: np.ndarray, new_tokens: int):
    """Feed ``prompts [B, P]`` one token per ``step35.forward`` call on our cache (ring buffers on
    the sliding layers), then decode ``new_tokens`` greedily the same way: one compiled step.
    Returns the prompt positions' logits ``[B, P, vocab]`` and the tokens ``[B, new_tokens]``."""
    batch, length = prompts.shape
    cache = step35.init_cache(cfg, batch, length + new_tokens)
    seen, out = [], []
    for t in range(length + new_tokens - 1):
        token = jnp.asarray(prompts[:, t]) if t < length else out[-1]
        logits, cache = _forward(params, token[:, None].astype(jnp.int32), cache, cfg)
        logits = logits[:, 0, :cfg.vocab_size]
        if t < length:
            seen.append(logits)
        if t >= length - 1:
            out.append(jnp.argmax(logits, axis=-1))
    return np.asarray(jnp.stack(seen, axis=1)), np.asarray(jnp.stack(out, axis=1))


def logit_error(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Max |difference|, the logit scale (largest |logit|), their ratio, argmax agreement."""
    err, scale = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(theirs)))
    return {"max_abs_err": err, "logit_scale": scale, "relative_err": err / scale,
            "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}


# ----- the CLI ----------------------------------------------------------------------------------

def compare(directory: Path, args) -> dict:
    """The comparisons the CLI prints: full-forward logits on ``args.tokens`` tokens, the
    cached token-by-token logits of an ``args.prompt``-token prompt, greedy continuations."""
    model = load_transformers(directory)
    cfg, params = load_ours(directory)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.tokens))
    result = {"config": cfg.name, "sliding_window": cfg.sliding_window,
              "forward": logit_error(our_logits(params, cfg, tokens), hf_logits(model, tokens))}
    prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt))
    seen, ours = our_greedy(params, cfg, prompts, args.decode)
    theirs = hf_greedy(model, prompts, args.decode)
    result["cached_prompt"] = logit_error(seen, hf_logits(model, prompts))
    result["greedy"] = {"tokens": int(ours.size), "agreement": float(np.mean(ours == theirs)),
                        "first_difference": next((int(t) for t in range(ours.shape[1])
                                                  if (ours[:, t] != theirs[:, t]).any()), None)}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="step35-tiny",
                    help="a Step-3.5 preset or config.json (default: step35-tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=40, help="prompt length, full forward")
    ap.add_argument("--prompt", type=int, default=6,
                    help="prompt length, cached token by token, then greedy decoding")
    ap.add_argument("--decode", type=int, default=24, help="greedy tokens to generate")
    ap.add_argument("--no-rope-scaling", action="store_true",
                    help="drop rope_scaling (plain RoPE on full layers too)")
    ap.add_argument("--keep", metavar="DIR", help="write the checkpoint here and keep it")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)  # small models; torch's spinning threads would slow XLA's
        text = text_config(args.config, rope_scaling=None if args.no_rope_scaling else "keep")
        with tempfile.TemporaryDirectory(prefix="step35-hf-") as tmp:
            directory = Path(args.keep or tmp)
            write_checkpoint(directory, text, args.seed)
            result = compare(directory, args)
    except Step3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"error: {e} (the comparison needs torch and transformers >= {MIN_TRANSFORMERS}: "
              "pip install -e '.[hf]')", file=sys.stderr)
        return 1
    import transformers

    result["transformers"] = transformers.__version__
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['config']} (window {result['sliding_window']}), "
          f"transformers {result['transformers']}, float32")
    for key, what in (("forward", f"forward, {args.tokens} tokens"),
                      ("cached_prompt", f"cached, {args.prompt} tokens one by one")):
        r = result[key]
        print(f"  logits ({what}): max |diff| {r['max_abs_err']:.3g} of logit scale "
              f"{r['logit_scale']:.3g} (relative {r['relative_err']:.2g}), argmax agreement "
              f"{r['argmax_agreement']:.2%}")
    g = result["greedy"]
    print(f"  greedy decoding ({args.decode} tokens x {args.batch}): {g['agreement']:.2%} of "
          f"{g['tokens']} tokens agree"
          + ("" if g["first_difference"] is None else
             f", first difference at step {g['first_difference']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
