"""Self-checks of the Step-3.5 NumPy reference (tests/reference_step35.py) itself: properties the
spec implies, checked without the JAX code."""
import json

import numpy as np

from step3_jax.model.config import presets_dir

import reference_step35 as ref

RAW = json.loads((presets_dir() / "step35-tiny.json").read_text())
SCALING = {"factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


def test_preset_parse_drops_the_mtp_entry():
    cfg = ref.parse_config(RAW)
    assert len(cfg["layers"]) == 5 and cfg["window"] == 8
    assert [lay["sliding"] for lay in cfg["layers"]] == [False, True, True, True, False]
    assert [lay["heads"] for lay in cfg["layers"]] == [4, 6, 6, 6, 4]
    assert [lay["rotary"] for lay in cfg["layers"]] == [8, 16, 16, 16, 8]
    assert [lay["scaling"] is not None for lay in cfg["layers"]] == [True, False, False, False,
                                                                      True]


def test_partial_rope_is_relative_and_norm_preserving():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal(16), rng.standard_normal(16)

    def dot(m, n):
        rot = lambda z, p: ref.partial_rope(z[None], np.array([p]), 8, 5e6, SCALING)[0]  # noqa
        return rot(q, m) @ rot(k, n)

    for delta in (0, 3, 40):
        np.testing.assert_allclose(dot(delta, 0), dot(delta + 100, 100), rtol=1e-10)
    x = rng.standard_normal((3, 7, 16))
    y = ref.partial_rope(x, np.arange(7) + 50, 8, 5e6, SCALING)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-12)
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])


def test_sliding_window_sees_w_positions_including_itself():
    """With v = one-hot positions and q = 0 (uniform scores), each output is the average of the
    visible keys: query p sees exactly min(p + 1, w) of them, the last being p itself."""
    cfg = ref.parse_config(RAW)
    lay, d, G, n, T = cfg["layers"][1], cfg["head_dim"], cfg["kv_heads"], 6, 20
    H = T
    W = {"q_proj": np.zeros((n * d, H)), "k_proj": np.zeros((G * d, H)),
         "v_proj": np.zeros((G * d, H)), "g_proj": np.full((n, H), 50.0),
         "q_norm": np.zeros(d), "k_norm": np.zeros(d)}
    W["v_proj"][0, :] = np.arange(H)  # value dim 0 of KV head 0 = the token's position
    W["o_proj"] = np.zeros((H, n * d))
    W["o_proj"][0, 0] = 1.0  # read head 0, dim 0
    u = np.eye(T)
    out = ref.attention(u, W, lay, cfg, np.arange(T))[:, 0]
    want = [np.mean(np.arange(max(0, p - cfg["window"] + 1), p + 1)) for p in range(T)]
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_router_example():
    logits = np.array([[2.0, 1.9, 0.0, 0.0, -1.0, -1.0, 1.5, 0.0]])
    bias = np.zeros(8)
    bias[6] = 0.5
    chosen, w = ref.route(logits, np.eye(8), bias, 2, 3.0)
    assert chosen == [[6, 0]]
    np.testing.assert_allclose(w.sum(), 3.0)
    chosen, _ = ref.route(logits, np.eye(8), None, 2, 3.0)
    assert chosen == [[0, 1]]
