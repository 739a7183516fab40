"""The Step-3.5 decoder (``step3_jax.model.step35``) against the independent float64 NumPy
reference (``tests/reference_step35.py``), part by part and end to end on the ``step35-tiny``
preset (window 8, so 20-token prompts cross it), plus the KV cache's prefill + decode = full
forward across the window edge.

Tolerances: the JAX side computes in float32 (matmul inner dims 16-96, unit-scale activations),
the reference in float64. One float32 rounding is ~6e-8 relative; sums of ~100 terms and the
few chained matmuls of a part stay under ~1e-5 relative (parts are checked at 2e-5 relative +
2e-5 absolute). RoPE angles ``pos * f`` carry ~6e-8 * pos absolute error (positions <= 300 here:
~2e-5). Through five layers and the LM head the logits (scale ~1) keep ~1e-5; they are checked at
1e-4 times the largest logit, which a real mistake (a missing ``1 +``, a window off by one, a
wrong clamp side) exceeds by orders of magnitude.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.model import step35, step35_layers as L
from step3_jax.model.config import presets_dir
from step3_jax.model.step35_config import RopeScaling
from step3_jax.model.step35_reader import from_step35_dict
from step3_jax.model.step35_weights import (Moe35, abstract_params, count_params, declare,
                                            from_hub_state, init_params, is_spec)

import reference_step35 as ref

PART = dict(rtol=2e-5, atol=2e-5)
RAW = json.loads((presets_dir() / "step35-tiny.json").read_text())
CFG = from_step35_dict(RAW, name="step35-tiny")
REF = ref.parse_config(RAW)
T = 20  # > 2 windows of 8


@pytest.fixture(scope="module")
def state():
    return ref.random_hub_state(RAW, seed=0)


@pytest.fixture(scope="module")
def params(state):
    return from_hub_state(state, CFG)


def _rand(*shape, scale=1.0, seed=1):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _attn_weights(state, i):
    return {k: state[f"model.layers.{i}.self_attn.{k}.weight"]
            for k in ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "q_norm", "k_norm")}


def test_preset_reads_the_same_in_both():
    assert CFG.sliding_window == REF["window"] == 8
    for i, lay in enumerate(REF["layers"]):
        spec = CFG.layer(i)
        assert (spec.window is not None) == lay["sliding"]
        assert (spec.q_heads, spec.rotary_dim, spec.rope_theta, spec.moe) == (
            lay["heads"], lay["rotary"], lay["theta"], lay["moe"])
        assert (spec.rope_scaling is not None) == (lay["scaling"] is not None)
        assert (spec.swiglu_limit, spec.swiglu_limit_shared) == (lay["limit"],
                                                                  lay["limit_shared"])


def test_znorm_is_zero_centred():
    x, w = _rand(3, 5, 64, scale=3.0), _rand(64, scale=0.1, seed=2)
    got = np.asarray(L.znorm(jnp.asarray(x), jnp.asarray(w), 1e-5))
    np.testing.assert_allclose(got, ref.znorm(x, w, 1e-5), **PART)
    # w = 0 is the identity scale (a plain-w norm would give zeros)
    plain = np.asarray(L.znorm(jnp.asarray(x), jnp.zeros(64), 1e-5))
    np.testing.assert_allclose(np.mean(plain ** 2, axis=-1), 1.0, rtol=1e-4)


def test_llama3_frequencies_all_three_bands():
    s = RopeScaling(factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
    got = L.inv_freq(16, 1e4, s)
    want = ref.rope_freqs(16, 1e4, dict(factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=64))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    plain = L.inv_freq(16, 1e4, None)
    ratio = plain / got
    assert ratio[0] == 1.0 and ratio[-1] == 2.0 and np.any((ratio > 1.0) & (ratio < 2.0))
    # the exponent's denominator is r, not d: theta^(-2j/r)
    np.testing.assert_allclose(L.inv_freq(8, 1e4, None), 1e4 ** (-np.arange(0, 8, 2) / 8))


@pytest.mark.parametrize("layer", [0, 1])  # full: r = 8 of 16 with llama3; sliding: r = 16
def test_partial_rope(layer):
    spec, lay = CFG.layer(layer), REF["layers"][layer]
    pos = np.arange(0, 300, 15)
    x = _rand(1, len(pos), 3, 16)
    got = np.asarray(L.partial_rope(jnp.asarray(x), jnp.asarray(pos[None]), spec))
    want = ref.partial_rope(x[0].transpose(1, 0, 2), pos, lay["rotary"], lay["theta"],
                            lay["scaling"]).transpose(1, 0, 2)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
    r = spec.rotary_dim
    np.testing.assert_array_equal(got[..., r:], x[..., r:])  # the rest passes through
    assert r == (8 if layer == 0 else 16)


@pytest.mark.parametrize("layer", [0, 1])  # full (4 heads) and sliding (6 heads, window 8)
def test_attention_with_qk_norm_gate_and_window(state, params, layer):
    u = _rand(1, T, CFG.hidden_size, seed=3)
    spec = CFG.layer(layer)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    got, _ = jax.jit(L.attention, static_argnums=(3, 4))(
        params.layers[layer].attn, jnp.asarray(u), pos, spec, CFG.rms_norm_eps)
    want = ref.attention(u[0], _attn_weights(state, layer), REF["layers"][layer], REF,
                         np.arange(T))
    np.testing.assert_allclose(np.asarray(got[0]), want, **PART)
    if spec.window is not None:  # the window matters here: w + 1 visible positions differ
        wider = ref.attention(u[0], _attn_weights(state, layer), REF["layers"][layer],
                              dict(REF, window=REF["window"] + 1), np.arange(T))
        assert np.max(np.abs(wider - want)) > 1e-2


def test_router_bias_only_chooses():
    E = CFG.moe_num_experts
    logits = np.array([[2.0, 1.9, 0.0, 0.0, -1.0, -1.0, 1.5, 0.0]], np.float32)
    bias = np.zeros(E, np.float32)
    bias[6] = 0.5
    p = Moe35(router=jnp.eye(E), router_bias=jnp.asarray(bias), gate=None, up=None, down=None,
              shared=None)
    w, idx = L.route(jnp.asarray(logits), p, CFG)
    assert sorted(np.asarray(idx[0]).tolist()) == [0, 6]  # unbiased top-2 would be [0, 1]
    s = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
    want = np.array([s[i] for i in np.asarray(idx[0])]) / (s[0] + s[6]) * 3.0
    np.testing.assert_allclose(np.asarray(w[0]), want, rtol=1e-6)
    chosen, ref_w = ref.route(logits, np.eye(E), bias, 2, 3.0)
    assert np.asarray(idx[0]).tolist() == chosen[0]
    np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-6)
    w0, idx0 = L.route(jnp.asarray(logits), p.replace(router_bias=None), CFG)
    assert sorted(np.asarray(idx0[0]).tolist()) == [0, 1]


def test_router_matches_reference(state, params):
    y = _rand(T, CFG.hidden_size, seed=4)
    m = "model.layers.1.moe."
    w, idx = L.route(jnp.asarray(y), params.layers[1].ffn, CFG)
    chosen, want = ref.route(y, state[m + "gate.weight"], state[m + "router_bias"], 2, 3.0)
    np.testing.assert_array_equal(np.asarray(idx), np.array(chosen))
    np.testing.assert_allclose(np.asarray(w), want, **PART)
    unbiased, _ = ref.route(y, state[m + "gate.weight"], None, 2, 3.0)
    assert unbiased != chosen  # the random bias does change some selections here


@pytest.mark.parametrize("limit", [0.0, 0.5, 0.1])
def test_clamped_swiglu(limit):
    y = _rand(T, 64, scale=4.0, seed=5)
    gate, up, down = _rand(32, 64, seed=6) / 8, _rand(32, 64, seed=7) / 8, _rand(64, 32, seed=8)
    got = np.asarray(L.clamped_swiglu(jnp.asarray(y), gate, up, down, limit))
    np.testing.assert_allclose(got, ref.swiglu(y, gate, up, down, limit), **PART)
    if limit:
        a = y.astype(np.float64) @ gate.T
        silu, u = a / (1 + np.exp(-a)), y.astype(np.float64) @ up.T
        assert np.mean(silu > limit) > 0.1 and np.mean(np.abs(u) > limit) > 0.1
        plain = np.asarray(L.clamped_swiglu(jnp.asarray(y), gate, up, down, 0.0))
        assert np.max(np.abs(plain - got)) > 0.1
    if limit == 0.1:  # upper-only on silu(gate): a two-sided clip would differ (silu >= -0.28)
        a = y.astype(np.float64) @ gate.T
        silu = a / (1 + np.exp(-a))
        assert np.mean(silu < -limit) > 0.05
        both = (np.clip(silu, -limit, limit) * np.clip(y @ up.T, -limit, limit)) @ down.T
        assert np.max(np.abs(both - got)) > 1e-2


@pytest.mark.parametrize("layer", [3, 4])  # routed clamp 0.5; shared clamp 1.0 on layer 4
def test_moe_layer(state, params, layer):
    y = _rand(1, T, CFG.hidden_size, seed=9)
    spec = CFG.layer(layer)
    got = jax.jit(L.moe, static_argnums=(2, 3))(params.layers[layer].ffn, jnp.asarray(y), spec,
                                                CFG)
    want = ref.moe(y[0], state, f"model.layers.{layer}.", REF["layers"][layer], REF)
    np.testing.assert_allclose(np.asarray(got[0]), want, **PART)


_forward = jax.jit(step35.forward, static_argnums=3)


def _logits_ok(got, want):
    err = np.max(np.abs(got[:, : CFG.vocab_size] - want))
    assert err <= 1e-4 * np.max(np.abs(want)), err


def test_forward_matches_reference(state, params):
    rng = np.random.default_rng(10)
    ids = rng.integers(0, CFG.vocab_size, size=(2, T))
    logits, cache = _forward(params, jnp.asarray(ids, jnp.int32), None, CFG)
    logits = np.asarray(logits)
    assert cache is None and logits.shape == (2, T, CFG.padded_vocab)
    for b in range(2):
        _logits_ok(logits[b], ref.forward(state, REF, ids[b]))
    assert np.all(np.isneginf(logits[..., CFG.vocab_size:]))


def test_prefill_then_decode_equals_full_forward(params):
    """A ragged batch: a 5-token and an 11-token (> window) prefill, single-token decodes
    across the window edge (8) and the ring's wrap (16), then a 12-token chunk (> window)
    on top of the cache."""
    rng = np.random.default_rng(11)
    seqs = rng.integers(0, CFG.vocab_size, size=(2, 32)).astype(np.int32)
    full = np.asarray(_forward(params, jnp.asarray(seqs), None, CFG)[0])
    cache = step35.init_cache(CFG, 2, 40)
    assert cache.k[0].shape[1] == 40 and cache.k[1].shape[1] == CFG.sliding_window
    pre = np.array([5, 11], np.int32)
    logits, cache = _forward(params, jnp.asarray(seqs[:, :11]), cache, CFG, jnp.asarray(pre))
    for b in range(2):
        _logits_ok(np.asarray(logits[b, : pre[b]]), full[b, : pre[b], : CFG.vocab_size])
    pos = pre.copy()
    while pos.min() < 20:
        num = (pos < 20).astype(np.int32)
        step = seqs[np.arange(2), np.minimum(pos, 31)][:, None]
        logits, cache = _forward(params, jnp.asarray(step), cache, CFG, jnp.asarray(num))
        for b in np.flatnonzero(num):
            _logits_ok(np.asarray(logits[b]), full[b, pos[b]: pos[b] + 1, : CFG.vocab_size])
        pos += num
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos)
    logits, cache = _forward(params, jnp.asarray(seqs[:, 20:]), cache, CFG)
    for b in range(2):
        _logits_ok(np.asarray(logits[b]), full[b, 20:, : CFG.vocab_size])
    np.testing.assert_array_equal(np.asarray(cache.lengths), [32, 32])


def test_declaration_counts_and_init():
    H, d, G, V = 64, 16, 2, 250
    attn = lambda n: 2 * n * d * H + 2 * G * d * H + n * H + 2 * d  # noqa: E731  q,o,k,v,g,norms
    heads = [4, 6, 6, 6, 4]
    moe = 8 * H + 8 + 8 * 3 * 32 * H + 3 * 32 * H  # router, bias, experts, shared
    total = 2 * V * H + H + sum(attn(n) + 2 * H for n in heads) + 3 * 96 * H + 4 * moe
    counts = count_params(CFG)
    assert counts["total"] == total
    assert counts["activated"] == total - V * H - 4 * 6 * 3 * 32 * H
    p = init_params(CFG, seed=0)
    shapes = jax.tree.map(lambda s: s.shape, declare(CFG), is_leaf=is_spec)
    assert jax.tree.map(lambda a: a.shape, p) == shapes
    assert not np.any(np.asarray(p.layers[0].input_norm)) and np.any(np.asarray(p.embed))
    bf16 = abstract_params(CFG.replace(dtype="bfloat16"))
    assert bf16.layers[1].ffn.router_bias.dtype == jnp.float32
    assert bf16.layers[1].ffn.router.dtype == jnp.bfloat16
