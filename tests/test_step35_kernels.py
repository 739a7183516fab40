"""Step-3.5's kernels at size: the routed experts on Step-3's per-backend MoE kernels (clamped),
and the blocked GQA attention with the sliding window, each against the simple computation it
replaces, on ``step35-tiny`` shapes.

Tolerances. MoE: the kernels and the all-experts float64 sum differ only by float32 rounding in
two matmuls of inner size 64 and 32 over O(1) values and the top-2 weighted sum (~1e-6
relative); 2e-5 relative + 2e-5 absolute is the Step-3.5 model tests' part tolerance, and a
clamp ignored or an expert dropped moves outputs by > 1e-1 (asserted). Attention: outputs are
convex combinations of unit normals; the blocked kernel rescales its running sums once per key
block (a few ulps per block, a handful of blocks), so blocked and plain agree to ~1e-6; 2e-5
absolute as ``tests/test_blocked_attention.py``, while a window off by one moves rows by O(0.1).
The attention layer and logits against the float64 reference: as ``tests/test_step35_model.py``
(2e-5 for a part; logits, scale ~1 and ~1e-5 off after float32 layers, at 1e-4 of the largest).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.model import step35, step35_layers as L
from step3_jax.model.blocked_attention import gqa_attend, gqa_attend_stats
from step3_jax.model.config import presets_dir
from step3_jax.model.moe import routed_experts
from step3_jax.model.step35_reader import from_step35_dict
from step3_jax.model.step35_weights import from_hub_state
from step3_jax.model.weights import unstack_moe

import reference_step35 as ref

PART = dict(rtol=2e-5, atol=2e-5)
ATOL = 2e-5
RAW = json.loads((presets_dir() / "step35-tiny.json").read_text())
CFG = from_step35_dict(RAW, name="step35-tiny")


@pytest.fixture(scope="module")
def state():
    return ref.random_hub_state(RAW, seed=0)


@pytest.fixture(scope="module")
def params(state):
    return from_hub_state(state, CFG)


# ----- routed experts -------------------------------------------------------------------------

def _all_experts(y, weights, idx, p, limit):
    """float64: every expert on every token, weighted by a dense [N, E] combine matrix."""
    y = np.asarray(y, np.float64)
    comb = np.zeros((y.shape[0], CFG.moe_num_experts))
    np.add.at(comb, (np.arange(y.shape[0])[:, None], np.asarray(idx)), np.asarray(weights))
    out = np.zeros_like(y)
    for e in range(CFG.moe_num_experts):
        g = y @ np.asarray(p.gate[e], np.float64).T
        g = g / (1 + np.exp(-g))
        u = y @ np.asarray(p.up[e], np.float64).T
        if limit:
            g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
        out += comb[:, e:e + 1] * ((g * u) @ np.asarray(p.down[e], np.float64).T)
    return out


@pytest.mark.parametrize("impl", ["loop", "loop_per_expert", "ragged", "blocks"])
def test_routed_experts_equal_all_experts(params, impl):
    """Layer 3's experts (clamp 0.5) on 20 tokens routed by the biased sigmoid router, the bias
    steering every token to expert 5: its load (20) passes the loop kernel's slot (8 rows)."""
    p = params.layers[3].ffn
    limit = CFG.layer(3).swiglu_limit
    assert limit == 0.5
    p = p.replace(router_bias=jnp.zeros(CFG.moe_num_experts).at[5].set(10.0))
    y = jnp.asarray(4 * np.random.default_rng(1).standard_normal((20, CFG.hidden_size)),
                    jnp.float32)
    weights, idx = L.route(y, p, CFG)
    assert np.all(np.any(np.asarray(idx) == 5, axis=1))
    cfg = CFG.replace(moe_impl=impl.split("_")[0])
    experts = unstack_moe(p) if impl == "loop_per_expert" else p
    got = np.asarray(jax.jit(routed_experts, static_argnums=(4, 5))(
        y, weights, idx, experts, cfg, limit))
    want = _all_experts(y, weights, idx, p, limit)
    np.testing.assert_allclose(got, want, **PART)
    unclamped = _all_experts(y, weights, idx, p, 0.0)
    assert np.max(np.abs(unclamped - want)) > 0.1  # the clamp is active on these inputs


# ----- blocked GQA attention ------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=5)
def _plain(q, k, v, q_pos, key_len, window, key_start=None):
    s_cap = k.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(s_cap, dtype=jnp.int32)[None], (k.shape[0], s_cap))
    valid = k_pos < key_len[:, None]
    if key_start is not None:
        valid &= k_pos >= key_start[:, None]
    return L.attend(q, k, v, L.visible(q_pos, k_pos, valid, window))


CASES = {
    # name: (batch, T, S, q_pos starts, key_len, key_start, window, q_block, k_block)
    "prefill_past_the_window": (1, 40, 40, [0], [40], None, 8, 8, 8),
    "chunk_over_a_cache": (2, 12, 48, [30, 3], [42, 15], None, 8, 5, 8),
    "ring_in_order": (2, 10, 18, [8, 8], [18, 18], [0, 5], 8, 4, 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gqa_attend_equals_plain(name):
    batch, t_len, s_cap, starts, key_len, key_start, window, qb, kb = CASES[name]
    n, G, d = 6, 2, 16  # a sliding layer's 6 query heads over 2 K/V heads
    rng = np.random.default_rng(len(name))
    q = jnp.asarray(rng.standard_normal((batch, t_len, n, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, s_cap, G, d)), jnp.float32)
            for _ in range(2))
    q_pos = jnp.asarray(np.asarray(starts)[:, None] + np.arange(t_len)[None], jnp.int32)
    key_len = jnp.asarray(key_len, jnp.int32)
    key_start = None if key_start is None else jnp.asarray(key_start, jnp.int32)
    got = np.asarray(gqa_attend(q, k, v, q_pos, key_len, key_start, window=window,
                                q_block=qb, k_block=kb))
    want = np.asarray(_plain(q, k, v, q_pos, key_len, window, key_start))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    if name == "prefill_past_the_window":  # one position more visible: a different answer
        wider = np.asarray(_plain(q, k, v, q_pos, key_len, window + 1, key_start))
        assert np.max(np.abs(wider - want)) > 1e-2


def test_gqa_attend_visits_only_the_band():
    """A 64-token prefill, window 8, blocks of 8: each query block reads its own key block and
    the one before (the band), not the triangle; per K/V head."""
    q = jnp.zeros((1, 64, 4, 16), jnp.float32)
    k = jnp.zeros((1, 64, 2, 16), jnp.float32)
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    _, visits = gqa_attend_stats(q, k, k, pos, jnp.asarray([64], jnp.int32), window=8,
                                 q_block=8, k_block=8)
    np.testing.assert_array_equal(np.asarray(visits)[0], [[1] + [2] * 7] * 2)


# ----- the model on the blocked cores ---------------------------------------------------------

def _logits_ok(got, want):
    err = np.max(np.abs(np.asarray(got)[..., : CFG.vocab_size] - want))
    assert err <= 1e-4 * np.max(np.abs(want)), err


def test_blocked_attention_layer_equals_reference(state, params):
    """A sliding layer (6 heads over 2 K/V heads, window 8) on 20 tokens without a cache, on
    the blocked core, against the float64 reference."""
    u = np.random.default_rng(3).standard_normal((1, 20, CFG.hidden_size)).astype(np.float32)
    spec = CFG.layer(1)
    got, _ = jax.jit(L.attention, static_argnums=(3, 4, 6))(
        params.layers[1].attn, jnp.asarray(u), jnp.arange(20, dtype=jnp.int32)[None], spec,
        CFG.rms_norm_eps, None, "blocked")
    weights = {k: state[f"model.layers.1.self_attn.{k}.weight"]
               for k in ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "q_norm", "k_norm")}
    want = ref.attention(u[0], weights, ref.parse_config(RAW)["layers"][1], ref.parse_config(RAW),
                         np.arange(20))
    np.testing.assert_allclose(np.asarray(got[0]), want, **PART)


def test_blocked_cached_model_equals_reference(state):
    """The preset cut to its first two layers (full + sliding MoE), ``attention_impl="blocked"``,
    a cache of 24: a ragged 11-token chunk (5 and 11 real tokens) into the empty cache, a
    second (11 and 5) over the partly filled (row 0) and wrapped (row 1) rings, then a decode
    step (one token: written first, then read over the ring in slot order) with a ragged
    batch's idle row. Logits against the float64 reference's full forward."""
    raw = dict(RAW, num_hidden_layers=2, num_nextn_predict_layers=0, moe_layers_enum="1")
    raw.update({k: v[:2] for k, v in RAW.items() if isinstance(v, list) and len(v) == 6})
    cfg = from_step35_dict(raw, name="step35-tiny-2", attention_impl="blocked")
    params = from_hub_state({k: v for k, v in state.items()
                             if not k.startswith(tuple(f"model.layers.{i}." for i in (2, 3, 4)))},
                            cfg)
    seqs = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 17)).astype(np.int32)
    full = np.stack([ref.forward(state, ref.parse_config(raw), seqs[b]) for b in range(2)])
    fwd = jax.jit(step35.forward, static_argnums=3)
    cache = step35.init_cache(cfg, 2, 24)
    start = np.zeros(2, np.int32)
    for num, width in (([5, 11], 11), ([11, 5], 11), ([1, 0], 1), ([0, 1], 1)):
        chunk = np.zeros((2, width), np.int32)
        for b in range(2):
            chunk[b, : num[b]] = seqs[b, start[b]: start[b] + num[b]]
        logits, cache = fwd(params, jnp.asarray(chunk), cache, cfg, jnp.asarray(num))
        for b in np.flatnonzero(num):
            _logits_ok(logits[b, : num[b]], full[b, start[b]: start[b] + num[b]])
        start += num
    np.testing.assert_array_equal(np.asarray(cache.lengths), [17, 17])


def test_moe_layer_under_expert_and_tensor_parallelism(params):
    """Layer 4's MoE (routed clamp 0.5, shared clamp 1.0) on an ``ep=2, tp=2`` mesh of emulated
    devices equals one device's: the same kernels on each device's 4 experts, half of each
    expert's width, summed by ``psum`` (float32 sums reordered: ~1e-6; checked at ``PART``)."""
    from step3_jax.model.sharding import make_mesh

    y = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, CFG.hidden_size)),
                    jnp.float32)
    run = jax.jit(L.moe, static_argnums=(2, 3))
    want = np.asarray(run(params.layers[4].ffn, y, CFG.layer(4), CFG))
    with jax.set_mesh(make_mesh(tp=2, ep=2)):
        got = np.asarray(run(params.layers[4].ffn, y, CFG.layer(4), CFG))
    np.testing.assert_allclose(got, want, **PART)
