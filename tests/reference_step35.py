"""Independent NumPy reference of the Step-3.5 text decoder, written from spec/step35.md only.

Float64 throughout; weights in the Hub (torch) layout ``[out, in]``, ``y = x @ W.T``, read by
their Hub names (spec §3) from a plain dict. One sequence at a time, no cache, every score
materialized: slow and simple on purpose, the oracle for ``step3_jax.model.step35``.
"""
from __future__ import annotations

import math

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


# ----------------------------------------------------------------------------- config (§1)
def parse_config(raw: dict) -> dict:
    """The StepFun (Hub) spelling of §1: per-layer lists trimmed to the trunk's
    ``num_hidden_layers`` (MTP entries dropped), sliding-layer heads from
    ``attention_other_setting``, llama3 ``rope_scaling`` on the ``yarn_only_types``."""
    c = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
    L = int(c["num_hidden_layers"])
    kinds = list(c["layer_types"])[:L]
    full_heads = int(c["num_attention_heads"])
    slide_heads = int(c.get("attention_other_setting", {}).get("num_attention_heads", full_heads))
    moe = c["moe_layers_enum"]
    moe = [int(s) for s in moe.split(",") if s.strip()] if isinstance(moe, str) else list(moe)
    scaled = set(c.get("yarn_only_types", ["full_attention"]))
    scaling = c.get("rope_scaling")

    def per_layer(key, default):
        v = c.get(key)
        return [default] * L if v is None else [x if x else default for x in list(v)[:L]]

    thetas = c["rope_theta"]
    thetas = [float(thetas)] * L if not isinstance(thetas, list) else [float(t) for t in thetas[:L]]
    layers = []
    for i, kind in enumerate(kinds):
        layers.append(dict(
            sliding=kind == "sliding_attention",
            heads=slide_heads if kind == "sliding_attention" else full_heads,
            theta=thetas[i],
            rotary=int(int(c["head_dim"]) * float(c["partial_rotary_factors"][i])),
            scaling=scaling if (scaling and kind in scaled) else None,
            moe=i in moe,
            limit=float(per_layer("swiglu_limits", 0.0)[i]),
            limit_shared=float(per_layer("swiglu_limits_shared", 0.0)[i]),
        ))
    return dict(
        hidden=int(c["hidden_size"]), layers=layers, head_dim=int(c["head_dim"]),
        kv_heads=int(c["num_attention_groups"]), window=int(c["sliding_window"]),
        vocab=int(c["vocab_size"]), eps=float(c.get("rms_norm_eps", 1e-5)),
        inter=int(c["intermediate_size"]), experts=int(c["moe_num_experts"]),
        top_k=int(c["moe_top_k"]), expert_inter=int(c["moe_intermediate_size"]),
        shared_inter=int(c.get("share_expert_dim", c.get("share_expert_dims", 0))),
        scale=float(c["moe_router_scaling_factor"]),
    )


# ----------------------------------------------------------------------------- random weights (§3)
def random_hub_state(raw: dict, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random tensors with the Hub names and shapes of §3. Norm weights are ``0.1 N(0,1)``
    (zero-centred: a missing ``1 +`` cannot hide); the router bias ``0.3 N(0,1)``, large enough
    against the sigmoid scores to change some selections; MTP tensors are not made."""
    cfg = parse_config(raw)
    rng = np.random.default_rng(seed)
    H, V, d, G = cfg["hidden"], cfg["vocab"], cfg["head_dim"], cfg["kv_heads"]
    E, Fe, Fs, Fd = cfg["experts"], cfg["expert_inter"], cfg["shared_inter"], cfg["inter"]

    def mat(*shape, std=None):
        return rng.standard_normal(shape) * (std if std is not None else 1 / math.sqrt(shape[-1]))

    def norm(n):
        return 0.1 * rng.standard_normal(n)

    s = {"model.embed_tokens.weight": rng.standard_normal((V, H))}
    for i, lay in enumerate(cfg["layers"]):
        p, n = f"model.layers.{i}.", lay["heads"]
        s[p + "input_layernorm.weight"] = norm(H)
        s[p + "post_attention_layernorm.weight"] = norm(H)
        a = p + "self_attn."
        s[a + "q_proj.weight"] = mat(n * d, H)
        s[a + "k_proj.weight"] = mat(G * d, H)
        s[a + "v_proj.weight"] = mat(G * d, H)
        s[a + "o_proj.weight"] = mat(H, n * d)
        s[a + "g_proj.weight"] = mat(n, H)
        s[a + "q_norm.weight"] = norm(d)
        s[a + "k_norm.weight"] = norm(d)
        if lay["moe"]:
            s[p + "moe.gate.weight"] = mat(E, H, std=2 / math.sqrt(H))
            s[p + "moe.router_bias"] = 0.3 * rng.standard_normal(E)
            s[p + "moe.gate_proj.weight"] = mat(E, Fe, H)
            s[p + "moe.up_proj.weight"] = mat(E, Fe, H)
            s[p + "moe.down_proj.weight"] = mat(E, H, Fe)
            s[p + "share_expert.gate_proj.weight"] = mat(Fs, H)
            s[p + "share_expert.up_proj.weight"] = mat(Fs, H)
            s[p + "share_expert.down_proj.weight"] = mat(H, Fs)
        else:
            s[p + "mlp.gate_proj.weight"] = mat(Fd, H)
            s[p + "mlp.up_proj.weight"] = mat(Fd, H)
            s[p + "mlp.down_proj.weight"] = mat(H, Fd)
    s["model.norm.weight"] = norm(H)
    s["lm_head.weight"] = mat(V, H)
    out = {k: v.astype(dtype) for k, v in s.items()}
    for k in out:
        if k.endswith("router_bias"):
            out[k] = s[k].astype(np.float32)  # float32 on the Hub whatever the model dtype
    return out


# ----------------------------------------------------------------------------- parts (§2)
def znorm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * (1 + w) over the last axis."""
    x = _f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + _f64(w))


def rope_freqs(r, theta, scaling):
    """inv_freq_j = theta^(-2j/r), j < r/2, then llama3 (when ``scaling``, a Hub dict)."""
    f = np.array([float(theta) ** (-2.0 * j / r) for j in range(r // 2)])
    if not scaling:
        return f
    factor, low = float(scaling["factor"]), float(scaling["low_freq_factor"])
    high, orig = float(scaling["high_freq_factor"]), float(scaling["original_max_position_embeddings"])
    out = []
    for fj in f:
        lam = 2 * math.pi / fj
        if lam > orig / low:
            out.append(fj / factor)
        elif lam < orig / high:
            out.append(fj)
        else:
            m = (orig / lam - low) / (high - low)
            out.append((1 - m) * fj / factor + m * fj)
    return np.array(out)


def partial_rope(x, positions, r, theta, scaling):
    """NeoX rotate-half on the first r dims of x [..., T, d]; the rest pass through."""
    x = _f64(x)
    if r == 0:
        return x
    f = rope_freqs(r, theta, scaling)
    ang = np.outer(_f64(positions), f)
    ang = np.concatenate([ang, ang], axis=-1)                    # [T, r]
    z = x[..., :r]
    rot = np.concatenate([-z[..., r // 2:], z[..., : r // 2]], axis=-1)
    return np.concatenate([z * np.cos(ang) + rot * np.sin(ang), x[..., r:]], axis=-1)


def _softmax(z):
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * _f64(z)))


def attention(u, W: dict, lay: dict, cfg: dict, positions):
    """§2 attention of one sequence on the normed input u [T, H]. W: the layer's Hub tensors
    without the ``self_attn.``/``.weight`` affixes (q_proj, k_proj, v_proj, o_proj, g_proj,
    q_norm, k_norm)."""
    u = _f64(u)
    T, n, G, d = u.shape[0], lay["heads"], cfg["kv_heads"], cfg["head_dim"]
    W = {k: _f64(v) for k, v in W.items()}
    q = (u @ W["q_proj"].T).reshape(T, n, d)
    k = (u @ W["k_proj"].T).reshape(T, G, d)
    v = (u @ W["v_proj"].T).reshape(T, G, d)
    q, k = znorm(q, W["q_norm"], cfg["eps"]), znorm(k, W["k_norm"], cfg["eps"])
    rope = lambda z: partial_rope(z.transpose(1, 0, 2), positions, lay["rotary"],  # noqa: E731
                                  lay["theta"], lay["scaling"])
    q, k, v = rope(q), rope(k), v.transpose(1, 0, 2)             # [heads, T, d]
    gate = _sigmoid(u @ W["g_proj"].T)                           # [T, n]
    pos = np.asarray(positions)
    vis = pos[None, :] <= pos[:, None]
    if lay["sliding"]:
        vis &= pos[None, :] > pos[:, None] - cfg["window"]
    o = np.zeros((T, n, d))
    for h in range(n):
        g = h // (n // G)
        scores = q[h] @ k[g].T / math.sqrt(d)
        o[:, h, :] = _softmax(np.where(vis, scores, -np.inf)) @ v[g]
        o[:, h, :] *= gate[:, h:h + 1]
    return o.reshape(T, n * d) @ W["o_proj"].T


def swiglu(y, gate, up, down, limit):
    """§2 clamped SwiGLU: min(silu(y@gate.T), L) * clip(y@up.T, -L, L); L=0: no clamp."""
    y = _f64(y)
    a = y @ _f64(gate).T
    g = a * _sigmoid(a)
    u = y @ _f64(up).T
    if limit:
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
    return (g * u) @ _f64(down).T


def route(y, router, bias, top_k, scale):
    """§2 router: (chosen expert lists, their weights) per token. Top-k of sigmoid + bias (ties:
    lower index), weights = unbiased scores renormalized, times ``scale``."""
    s = _sigmoid(_f64(y) @ _f64(router).T)
    b = np.zeros(s.shape[-1]) if bias is None else _f64(bias)
    chosen, weights = [], []
    for t in range(s.shape[0]):
        idx = sorted(range(s.shape[1]), key=lambda e: (-(s[t, e] + b[e]), e))[:top_k]
        w = s[t, idx]
        chosen.append(idx)
        weights.append(w / w.sum() * scale)
    return chosen, np.array(weights)


def moe(y, state, prefix, lay, cfg):
    """Routed experts + shared expert of one layer (``prefix`` = ``model.layers.{i}.``)."""
    y = _f64(y)
    m = prefix + "moe."
    chosen, weights = route(y, state[m + "gate.weight"], state.get(m + "router_bias"),
                            cfg["top_k"], cfg["scale"])
    out = np.zeros_like(y)
    for t in range(y.shape[0]):
        for e, w in zip(chosen[t], weights[t]):
            out[t] += w * swiglu(y[t:t + 1], state[m + "gate_proj.weight"][e],
                                 state[m + "up_proj.weight"][e],
                                 state[m + "down_proj.weight"][e], lay["limit"])[0]
    s = prefix + "share_expert."
    return out + swiglu(y, state[s + "gate_proj.weight"], state[s + "up_proj.weight"],
                        state[s + "down_proj.weight"], lay["limit_shared"])


def decoder_layer(x, state, i, cfg, positions):
    p, lay, eps = f"model.layers.{i}.", cfg["layers"][i], cfg["eps"]
    W = {k: state[f"{p}self_attn.{k}.weight"]
         for k in ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "q_norm", "k_norm")}
    h = _f64(x) + attention(znorm(x, state[p + "input_layernorm.weight"], eps), W, lay, cfg,
                            positions)
    y = znorm(h, state[p + "post_attention_layernorm.weight"], eps)
    if lay["moe"]:
        return h + moe(y, state, p, lay, cfg)
    return h + swiglu(y, state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"],
                      state[p + "mlp.down_proj.weight"], lay["limit_shared"])


def forward(state, cfg, token_ids):
    """Full causal forward of one sequence: logits [T, vocab] (float64)."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    x = _f64(state["model.embed_tokens.weight"])[ids]
    positions = np.arange(ids.shape[0])
    for i in range(len(cfg["layers"])):
        x = decoder_layer(x, state, i, cfg, positions)
    return znorm(x, state["model.norm.weight"], cfg["eps"]) @ _f64(state["lm_head.weight"]).T
