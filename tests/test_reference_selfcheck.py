"""Self-checks of the NumPy reference (tests/reference.py) itself."""
import ml_dtypes
import numpy as np

try:  # works whether or not tests/ is a package
    from tests import reference as ref
except ImportError:  # pragma: no cover
    import reference as ref

TINY = {
    "model_type": "step3_text", "hidden_size": 64, "num_hidden_layers": 4,
    "moe_layers_enum": "1,2", "num_attention_heads": 4, "num_attention_groups": 1,
    "head_dim": 16, "share_q_dim": 32, "moe_num_experts": 8, "moe_top_k": 3,
    "moe_intermediate_size": 32, "share_expert_dim": 32, "intermediate_size": 96,
    "vocab_size": 250, "rms_norm_eps": 1e-5, "rope_theta": 10000,
}


def test_rope_norm_and_relative_position():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 16))
    y = ref.rope(x, np.arange(100, 107), 10000.0)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    q, k = rng.standard_normal(16), rng.standard_normal(16)

    def dot(m, n):
        return ref.rope(q[None], np.array([m]), 10000.0)[0] @ ref.rope(k[None], np.array([n]), 10000.0)[0]

    for delta in (0, 1, 5, 37):
        base = dot(delta, 0)
        for m in (3, 50, 1234):
            np.testing.assert_allclose(dot(m + delta, m), base, rtol=1e-9, atol=1e-9)
    assert abs(dot(1, 0) - dot(0, 0)) > 1e-3  # rotation actually does something


def test_rms_norm_unit_rms():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)) * 3.0
    for scale in (1.0, 2.5):
        y = ref.rms_norm(x, scale * np.ones(64), 1e-6)
        np.testing.assert_allclose(np.sqrt(np.mean(y * y, axis=-1)), scale, rtol=1e-6)


def test_dequant_block_fp8_edges():
    f8 = ml_dtypes.float8_e4m3fn
    rng = np.random.default_rng(2)
    w = rng.standard_normal((2, 130, 260)).astype(f8)
    scale = np.arange(1, 13, dtype=np.float32).reshape(2, 2, 3) * 0.5  # [2, ceil(130/128), ceil(260/128)]
    w[1, 129, 259], w[0, 128, 5], w[1, 3, 256], w[0, 127, 127], w[0, 0, 128] = 1.5, -2.0, 0.5, 3.0, -0.25
    out = ref.dequant_block_fp8(w, scale)
    assert out.dtype == np.float32 and out.shape == (2, 130, 260)
    # scale[e, r, c] = 0.5 * (6e + 3r + c + 1)
    expect = {(1, 129, 259): 1.5 * 6.0, (0, 128, 5): -2.0 * 2.0, (1, 3, 256): 0.5 * 4.5,
              (0, 127, 127): 3.0 * 0.5, (0, 0, 128): -0.25 * 1.0}
    for idx, val in expect.items():
        np.testing.assert_allclose(out[idx], val, rtol=0, atol=1e-7)
    np.testing.assert_allclose(out[1, 128:, 256:], w[1, 128:, 256:].astype(np.float32) * 6.0, rtol=0, atol=1e-6)


def test_parse_config_wrapper_and_string_layers():
    cfg = ref.parse_config({"model_type": "step3_vl", "text_config": dict(TINY, rope_parameters={"rope_theta": 7.0})})
    assert cfg["moe_layers"] == [1, 2] and cfg["rope_theta"] == 7.0 and cfg["norm_expert_weight"] is False
    assert ref.parse_config(dict(TINY, moe_layers_enum=[2, 1]))["moe_layers"] == [1, 2]


def test_forward_is_causal():
    cfg = ref.parse_config(TINY)
    state = ref.random_hub_state(TINY, seed=3)
    assert state["model.layers.1.moe.gate_proj.weight"].shape == (8, 32, 64)
    assert state["model.layers.2.moe.down_proj.weight"].shape == (8, 64, 32)
    assert "model.layers.3.mlp.down_proj.weight" in state and "model.layers.3.moe.gate.weight" not in state
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 250, size=10)
    ids2 = ids.copy()
    ids2[6:] = (ids[6:] + 17) % 250
    a, b = ref.forward(state, cfg, ids), ref.forward(state, cfg, ids2)
    assert a.shape == (10, 250) and np.all(np.isfinite(a))
    np.testing.assert_allclose(a[:6], b[:6], rtol=0, atol=1e-10)
    assert np.max(np.abs(a[6:] - b[6:])) > 1e-3  # later positions do see the change
    lp = ref.log_probs(state, cfg, ids)
    assert lp.shape == (9,) and np.all(lp <= 0)
    assert ref.greedy(state, cfg, ids[:4], 1) == [int(np.argmax(ref.forward(state, cfg, ids[:4])[-1]))]
