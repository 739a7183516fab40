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
Logits (blocked vs plain, whole model): both float32, scale ~1, checked at 1e-4 of the largest
as the model tests do.
"""

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
from step3_jax.model.step35_weights import init_params
from step3_jax.model.weights import unstack_moe

PART = dict(rtol=2e-5, atol=2e-5)
ATOL = 2e-5
CFG = from_step35_dict(json.loads((presets_dir() / "step35-tiny.json").read_text()),
                       name="step35-tiny")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=0)


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
    "decode_ragged_full": (3, 1, 50, [0, 17, 49], [1, 18, 50], None, None, 1, 16),
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
    if window is not None:  # one position more or less is visible: a different answer
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


# ----- the whole model, blocked against plain -------------------------------------------------

def _logits_ok(got, want):
    got, want = np.asarray(got)[..., : CFG.vocab_size], np.asarray(want)[..., : CFG.vocab_size]
    err = np.max(np.abs(got - want))
    assert err <= 1e-4 * np.max(np.abs(want)), err


def test_blocked_model_equals_plain(params):
    """Full forward (20 tokens > 2 windows); then a ragged prefill (5 and 11 tokens) into a
    cache, a decode step, and a 12-token chunk (> window) over the ring: the blocked cores
    (the ring read in position order) against the plain ones, logits compared everywhere."""
    fwd = jax.jit(step35.forward, static_argnums=3)
    blocked, plain = (CFG.replace(attention_impl=i) for i in ("blocked", "plain"))
    seqs = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 29)), jnp.int32)
    full = fwd(params, seqs, None, plain)[0]
    _logits_ok(fwd(params, seqs[:, :20], None, blocked)[0], full[:, :20])
    cache = step35.init_cache(CFG, 2, 32)
    pre = jnp.asarray([5, 11], jnp.int32)
    logits, cache = fwd(params, seqs[:, :11], cache, blocked, pre)
    for b in range(2):
        _logits_ok(logits[b, : int(pre[b])], full[b, : int(pre[b])])
    step = jnp.stack([seqs[0, 5:6], seqs[1, 11:12]])
    logits, cache = fwd(params, step, cache, blocked)
    _logits_ok(logits[:, 0], jnp.stack([full[0, 5], full[1, 11]]))
    # Bring row 0 level with row 1 (plain, short chunk), then a 12-token blocked chunk.
    tail = jnp.stack([seqs[0, 6:12], seqs[1, 12:18]])
    _, cache = fwd(params, tail, cache, plain, jnp.asarray([6, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [12, 12])
    logits, cache = fwd(params, seqs[:, 12:24], cache, blocked)
    _logits_ok(logits, full[:, 12:24])
