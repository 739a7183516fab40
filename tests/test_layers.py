"""Each sub-layer against the independent NumPy reference (tests/reference.py, float64).

Tolerances: our path runs in float32 (eps 1.2e-7) through a handful of contractions of width
<= 128 on O(1) activations, so deviations from float64 are ~1e-6; 1e-4 absolute leaves margin
while still catching any formula error (those show up at 1e-2 or more).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.model import attention
from step3_jax.model.layers import rms_norm, rope, swiglu
from step3_jax.model.moe import route, routed_experts, slot_rows

import reference as ref

ATOL = 1e-4


def _layer(params, layer, cfg):
    return params.layers[layer]


def _short(state, layer, part):
    prefix = f"model.layers.{layer}.{part}."
    return {k[len(prefix):].removesuffix(".weight"): v for k, v in state.items()
            if k.startswith(prefix)}


def test_rms_norm_scales_by_w_not_one_plus_w(tiny_cfg):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(5, 64)).astype(np.float32), rng.normal(size=64).astype(np.float32)
    got = rms_norm(jnp.asarray(x), jnp.asarray(w), tiny_cfg.rms_norm_eps)
    np.testing.assert_allclose(got, ref.rms_norm(x, w, tiny_cfg.rms_norm_eps), atol=1e-5)


def test_rope_is_neox_rotate_half_over_full_head(tiny_cfg):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 16)).astype(np.float32)
    pos = np.array([0, 1, 2, 5, 100, 300, 511])
    got = rope(jnp.asarray(x)[None], jnp.asarray(pos)[None], tiny_cfg.rope_theta)[0]
    np.testing.assert_allclose(got, ref.rope(x, pos, tiny_cfg.rope_theta), atol=1e-4)
    # GPT-J interleaved pairs would rotate (x0, x1) together; NeoX pairs (x0, x8): check one.
    one = np.zeros((1, 16), np.float32)
    one[0, 0] = 1.0
    out = np.asarray(rope(jnp.asarray(one)[None], jnp.asarray([[1]]), tiny_cfg.rope_theta))[0, 0]
    assert abs(out[8] - np.sin(1.0)) < 1e-6 and abs(out[1]) < 1e-7


def test_mfa_matches_reference(tiny_params, tiny_cfg, tiny_raw, hub_state):
    """Pitfall 1: inter_norm over the whole low-rank query, RoPE after wq, scale 1/sqrt(d)."""
    cfg_ref = ref.parse_config(tiny_raw)
    x = np.random.default_rng(2).normal(size=(9, 64)).astype(np.float32)
    pos = np.arange(9)
    for layer in (0, 2):
        p = _layer(tiny_params, layer, tiny_cfg).attn
        q, k, v = attention.project_qkv(p, jnp.asarray(x)[None], jnp.asarray(pos)[None], tiny_cfg)
        want = ref.mfa(x, _short(hub_state, layer, "self_attn"), cfg_ref, pos)
        for impl in ("plain", "blocked"):  # both kernels of the attention switch
            o = attention.attend_positions(q, jnp.swapaxes(k, 1, 2), v, jnp.asarray(pos)[None],
                                           jnp.asarray([9]), tiny_cfg.replace(attention_impl=impl))
            np.testing.assert_allclose(attention.output(p, o)[0], want, atol=ATOL)


def test_attention_scale_is_one_over_sqrt_head_dim():
    d = 256
    q = np.zeros((1, 1, 1, d), np.float32)
    q[..., 0] = 16.0  # q.k = 16 * k0, so the score is k0 when the scale is 1/16
    k = np.zeros((1, 2, d), np.float32)
    k[0, 1, 0] = 1.0  # scores (0, 1)
    v = np.eye(2, d, dtype=np.float32)[None]
    k_t = jnp.swapaxes(jnp.asarray(k), 1, 2)  # attend takes the keys as the cache stores them
    o = attention.attend(jnp.asarray(q), k_t, jnp.asarray(v), jnp.ones((1, 1, 2), bool))
    np.testing.assert_allclose(o[0, 0, 0, :2], [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)


def test_dense_swiglu_matches_reference(tiny_params, tiny_cfg, hub_state):
    x = np.random.default_rng(3).normal(size=(6, 64)).astype(np.float32)
    for layer in (0, 3):  # first and last layers are dense
        p = _layer(tiny_params, layer, tiny_cfg).ffn
        s = _short(hub_state, layer, "mlp")
        got = swiglu(jnp.asarray(x), p.gate, p.up, p.down)
        np.testing.assert_allclose(got, ref.swiglu(x, s["gate_proj"], s["up_proj"],
                                                   s["down_proj"]), atol=ATOL)


@pytest.mark.parametrize("impl", ["loop", "ragged"])
@pytest.mark.parametrize("norm", [False, True])
def test_routed_moe_matches_reference(tiny_params, tiny_cfg, hub_state, impl, norm):
    """Pitfall 2: float32 softmax over all experts, top-3 of the probabilities, no renorm."""
    cfg = tiny_cfg.replace(moe_impl=impl, norm_expert_weight=norm)
    x = np.random.default_rng(4).normal(size=(11, 64)).astype(np.float32)
    p = _layer(tiny_params, 1, cfg).ffn
    s = _short(hub_state, 1, "moe")
    w, idx = route(jnp.asarray(x), p.router, cfg)
    got = routed_experts(jnp.asarray(x), w, idx, p, cfg)
    want = ref.moe(x, s["gate"], s["gate_proj"], s["up_proj"], s["down_proj"], 3, norm)
    np.testing.assert_allclose(got, want, atol=ATOL)
    if not norm:  # the chosen probabilities are not renormalized: they sum to < 1
        assert float(jnp.max(jnp.sum(w, axis=-1))) < 0.999


@pytest.mark.parametrize("n", [1, 5, 64, 65, 300])
def test_loop_and_ragged_kernels_agree_under_skewed_load(tiny_params, tiny_cfg, n):
    """Dropless: one expert taking every token needs several slots of the loop kernel."""
    p = _layer(tiny_params, 1, tiny_cfg).ffn
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(n, 64)).astype(np.float32))
    # Every token picks expert 0 plus two distinct others.
    idx = np.stack([np.concatenate([[0], rng.choice(np.arange(1, 8), 2, replace=False)])
                    for _ in range(n)]).astype(np.int32)
    w = jnp.asarray(rng.uniform(0.1, 0.5, size=(n, 3)).astype(np.float32))
    idx = jnp.asarray(idx)
    assert slot_rows(n, tiny_cfg) < n or n == 1  # expert 0 really needs several slots
    loop_cfg = tiny_cfg.replace(moe_impl="loop")
    loop = routed_experts(x, w, idx, p, loop_cfg)
    per_expert = p.replace(gate=tuple(p.gate), up=tuple(p.up), down=tuple(p.down))
    loop_unstacked = routed_experts(x, w, idx, per_expert, loop_cfg)
    ragged = routed_experts(x, w, idx, p, tiny_cfg.replace(moe_impl="ragged"))
    np.testing.assert_allclose(loop, ragged, atol=1e-5)
    np.testing.assert_allclose(loop_unstacked, ragged, atol=1e-5)
    assert float(jnp.min(jnp.abs(loop).sum(-1))) > 0  # no token dropped
