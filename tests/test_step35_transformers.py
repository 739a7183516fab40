"""Our Step-3.5 decoder against transformers' native implementation (``transformers.models.
step3p7``, transformers >= 5.16) on random ``step35-tiny`` models saved in the Hub layout
(``tools/compare_transformers_step35.py`` builds and runs both; read its docstring for how
transformers is made to load a Step-3.5 checkpoint). Skipped unless torch and transformers are
installed (``pip install -e '.[hf]'``; CI does not install them).

Two models, identical tensors (same seed, same shapes), differing only in RoPE scaling on the
full-attention layers: ``scaled``, the preset's llama3 with ``original_max_position_embeddings``
raised from 64 to 512 so that the full layers' four rotary frequencies fall in all three llama3
bands (kept, interpolated, divided; checked below), and ``plain``, without ``rope_scaling``.
Norm weights and the router bias are non-zero; the checkpoint also carries NaN-filled stand-ins
for the MTP layer's tensors, which both sides must skip; the preset's clamps (0.5 routed on
layers 3-4, 1.0 shared on layer 4) bind on unit-scale pre-activations -- the last test shows
that switching any of them off in transformers' model moves its logits far outside the
tolerance.

Tolerance: both sides compute in float32 from the same float32 weights; they differ only in the
order of float32 operations (matmul summation over 16-96 terms, RoPE frequencies computed in
float32 by transformers and in float64 then rounded by us -- angle error ~6e-8 * position, 2e-6
at position 40 -- softmax and norm reductions). Each rounding is ~6e-8 relative; through five
layers the logits (scale ~4) differ by ~3e-6, i.e. ~1e-6 of the logit scale (measured: forward
8.4e-7 scaled, 8.0e-7 plain, cached 7.9e-7). The assertion is 2e-5 of the largest |logit|: 20x
headroom over what float32 reordering gives, and 50x below the smallest change a real semantic
difference makes here (the last test requires > 1e-3 of each; measured 2e-2 to 1).
"""

import contextlib
import json
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402  (a transformers dependency)

from conftest import ROOT, run_cli  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import compare_transformers_step35 as cmp  # noqa: E402

from step3_jax.model.config import presets_dir  # noqa: E402
from step3_jax.model.step35_layers import inv_freq  # noqa: E402
from step3_jax.model.step35_reader import from_step35_dict  # noqa: E402

if Version(transformers.__version__) < Version(cmp.MIN_TRANSFORMERS):
    pytest.skip(f"transformers {transformers.__version__} < {cmp.MIN_TRANSFORMERS} has no step3p7",
                allow_module_level=True)
# One torch thread: its spinning worker threads fight XLA's for the cores (on a loaded 2-core
# machine ``generate`` took 18.7 s with two threads, 0.5 s with one); tiny models need no more.
torch.set_num_threads(1)

REL_TOL = 2e-5     # of the largest |logit| (module docstring)
SEMANTIC = 1e-3    # the least a switched-off mechanism must change the logits by
FORWARD_T = 40     # full forward: 5 windows of 8
PROMPT_T = 6       # cached prompt, shorter than the window
DECODE = 26        # greedy tokens: positions 6..31, the ring buffers wrap three times
SCALING = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 512}


def _setup(tmp_path_factory, name, rope_scaling):
    directory = tmp_path_factory.mktemp(name)
    cmp.write_checkpoint(directory, cmp.text_config("step35-tiny", rope_scaling=rope_scaling),
                         seed=0)
    cfg, params = cmp.load_ours(directory)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, FORWARD_T))
    return {"cfg": cfg, "params": params, "model": cmp.load_transformers(directory),
            "dir": directory,
            "tokens": tokens, "ours": cmp.our_logits(params, cfg, tokens)}


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    return _setup(tmp_path_factory, "scaled", SCALING)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _setup(tmp_path_factory, "plain", None)


def _relative(ours, theirs):
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_transformers_reads_the_hub_config_as_we_do(tmp_path):
    """A bare ``step3p5`` config.json (the preset, MTP padding included): transformers'
    ``Step3p7TextConfig`` and our reader agree field by field, and our reader reads
    transformers' own spelling of it (``to_dict``) back to the same config."""
    raw = json.loads((presets_dir() / "step35-tiny.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = from_step35_dict(raw, name="step35-tiny")
    L = ours.num_hidden_layers
    assert type(hf).__name__ == "Step3p7TextConfig"
    assert hf.layer_types == list(ours.layer_types)
    assert [i for i, k in enumerate(hf.mlp_layer_types) if k == "sparse"] == list(ours.moe_layers)
    assert [hf.per_layer_config[i].num_attention_heads for i in range(L)] == \
        list(ours.attention_heads)
    for i in range(L):
        spec, rope = ours.layer(i), hf.rope_parameters[ours.layer_types[i]]
        assert rope["rope_theta"] == spec.rope_theta
        assert hf.head_dim * rope.get("partial_rotary_factor", 1.0) == spec.rotary_dim
        if spec.rope_scaling is None:
            assert rope["rope_type"] == "default"
        else:
            assert rope["rope_type"] == "llama3"
            assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                    rope["original_max_position_embeddings"]) == (
                spec.rope_scaling.factor, spec.rope_scaling.low_freq_factor,
                spec.rope_scaling.high_freq_factor,
                spec.rope_scaling.original_max_position_embeddings)
    assert [v or 0.0 for v in hf.swiglu_limits] == list(ours.swiglu_limits)
    assert [v or 0.0 for v in hf.swiglu_limits_shared] == list(ours.swiglu_limits_shared)
    assert (hf.sliding_window, hf.num_key_value_heads, hf.head_dim, hf.hidden_size,
            hf.vocab_size, hf.intermediate_size, hf.n_routed_experts, hf.num_experts_per_tok,
            hf.moe_intermediate_size, hf.share_expert_dim, hf.moe_router_scaling_factor,
            hf.rms_norm_eps, hf.num_nextn_predict_layers, hf.tie_word_embeddings) == (
        ours.sliding_window, ours.num_attention_groups, ours.head_dim, ours.hidden_size,
        ours.vocab_size, ours.intermediate_size, ours.moe_num_experts, ours.moe_top_k,
        ours.moe_intermediate_size, ours.share_expert_dim, ours.moe_router_scaling_factor,
        ours.rms_norm_eps, ours.num_nextn_predict_layers, ours.tie_word_embeddings)
    assert from_step35_dict(hf.to_dict(), name="step35-tiny") == ours


def test_the_scaled_model_hits_every_llama3_band(scaled):
    """The full layers' wavelengths straddle both llama3 thresholds (orig/high = 128 and
    orig/low = 512 positions), so the comparison covers the kept, interpolated and divided
    frequencies: each band changes at least one frequency or keeps one exactly."""
    spec = scaled["cfg"].layer(0)
    plain_f = inv_freq(spec.rotary_dim, spec.rope_theta, None)
    lam = 2 * math.pi / plain_f
    s = spec.rope_scaling
    orig = s.original_max_position_embeddings
    assert (lam < orig / s.high_freq_factor).any()
    assert ((lam >= orig / s.high_freq_factor) & (lam <= orig / s.low_freq_factor)).any()
    assert (lam > orig / s.low_freq_factor).any()


@pytest.mark.parametrize("variant", ["scaled", "plain"])
def test_forward_logits_match(variant, request):
    """Full causal forward over 40 tokens (5 sliding windows), batch 2: every logit within
    2e-5 of the logit scale, the same argmax everywhere."""
    case = request.getfixturevalue(variant)
    theirs = cmp.hf_logits(case["model"], case["tokens"])
    assert _relative(case["ours"], theirs) < REL_TOL
    np.testing.assert_array_equal(case["ours"].argmax(-1), theirs.argmax(-1))


def test_cached_prompt_and_greedy_decode_match(scaled):
    """A 6-token prompt (shorter than the window) fed token by token through our cache matches
    transformers' forward on it; then 26 greedy tokens (positions 6..31, across the window
    edge three times) from our ring-buffer cache equal transformers' ``generate``, token for
    token, on both sequences."""
    cfg, params, model = scaled["cfg"], scaled["params"], scaled["model"]
    prompts = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, PROMPT_T))
    seen, ours = cmp.our_greedy(params, cfg, prompts, DECODE)
    theirs = cmp.hf_logits(model, prompts)
    assert _relative(seen, theirs) < REL_TOL
    np.testing.assert_array_equal(ours, cmp.hf_greedy(model, prompts, DECODE))


def test_cli_generate_and_score_on_the_checkpoint_match(scaled, capsys):
    """``step3-jax generate --checkpoint`` and ``score --checkpoint`` on the saved Hub checkpoint
    (a ``step3p7`` wrapper with MTP stand-ins, read by the library's loader): the greedy tokens
    of both prompts equal transformers' ``generate``; the score's log-probabilities are within
    2 x 2e-5 of the logit scale of transformers' (a log-softmax moves by at most twice the
    largest logit error)."""
    cfg, model, directory = scaled["cfg"], scaled["model"], str(scaled["dir"])
    prompts = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, PROMPT_T))
    argv = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    code, out, err = run_cli(capsys, "generate", "--checkpoint", directory, *argv,
                             "--max-new-tokens", str(DECODE), "--eos-id", "-1", "--json", "-q")
    assert code == 0, err
    got = [r["generated_ids"] for r in json.loads(out)["results"]]
    np.testing.assert_array_equal(got, cmp.hf_greedy(model, prompts, DECODE))
    ids = scaled["tokens"][0]
    code, out, err = run_cli(capsys, "score", "--checkpoint", directory, "--ids",
                             ",".join(map(str, ids)), "--json", "-q")
    assert code == 0, err
    theirs = cmp.hf_logits(model, ids[None])[0, :-1].astype(np.float64)
    logp = theirs - theirs.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = logp[np.arange(len(ids) - 1), ids[1:]]
    got = np.asarray(json.loads(out)["logprobs"])
    assert np.abs(got - want).max() < 2 * REL_TOL * np.abs(theirs).max()


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def test_the_comparison_sees_each_mechanism(scaled, plain):
    """Each mechanism the comparison claims to check moves the logits by > 1e-3 of their scale
    (50x the tolerance) when switched off on transformers' side alone: the routed clamp, the
    shared clamp, the router's selection bias, the window (9 instead of 8), and llama3 scaling
    (the ``plain`` model has the same tensors)."""
    model, tokens, ours = scaled["model"], scaled["tokens"], scaled["ours"]
    layers = model.model.language_model.layers
    moe = [layer.mlp for layer in layers if hasattr(layer.mlp, "experts")]
    text = model.config.text_config
    switches = {
        "routed clamp": [(m.experts, "limit", float("inf")) for m in moe],
        "shared clamp": [(m.shared_experts, "limit", float("inf")) for m in moe],
        "router bias": [(m.gate, "e_score_correction_bias",
                         torch.zeros_like(m.gate.e_score_correction_bias)) for m in moe],
        "window + 1": [(text, "sliding_window", text.sliding_window + 1)],
    }
    moved = {}
    for what, patches in switches.items():
        with contextlib.ExitStack() as stack:
            for obj, name, value in patches:
                stack.enter_context(_patched(obj, name, value))
            moved[what] = _relative(ours, cmp.hf_logits(model, tokens))
    moved["llama3 scaling"] = _relative(ours, cmp.hf_logits(plain["model"], tokens))
    assert _relative(ours, cmp.hf_logits(model, tokens)) < REL_TOL  # everything restored
    assert all(v > SEMANTIC for v in moved.values()), moved
