"""Independent NumPy reference of the Step-3 text decoder (written from spec/model.md only).

Everything is computed in float64; weights use the Hub (torch) layout ``[out, in]``, ``y = x @ W.T``.
Slow and simple on purpose: it is the oracle for the JAX implementation's tests.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

_STEP3_MOE_LAYERS = tuple(range(4, 60))  # spec §1 default (Step-3: 4..59)


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


# ----------------------------------------------------------------------------- config (§1)
def parse_config(raw: dict) -> dict:
    """Spec §1: accept the ``step3_vl`` wrapper (``text_config``) or a bare text config."""
    c = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
    n_layers = int(c["num_hidden_layers"])
    moe = c.get("moe_layers_enum")
    if moe is None:  # unconfirmed key: fall back to the Step-3 default, clipped to the depth
        moe = [i for i in _STEP3_MOE_LAYERS if i < n_layers]
    elif isinstance(moe, str):
        moe = [int(s) for s in moe.split(",") if s.strip()]
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 500000.0))
    heads = int(c["num_attention_heads"])
    return dict(
        hidden_size=int(c["hidden_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_attention_groups=int(c.get("num_attention_groups", 1)),
        head_dim=int(c.get("head_dim", int(c["hidden_size"]) // heads)),
        share_q_dim=int(c["share_q_dim"]),
        intermediate_size=int(c["intermediate_size"]),
        moe_num_experts=int(c["moe_num_experts"]),
        moe_top_k=int(c["moe_top_k"]),
        moe_intermediate_size=int(c["moe_intermediate_size"]),
        share_expert_dim=int(c.get("share_expert_dim", c["moe_intermediate_size"])),
        moe_layers=sorted(int(i) for i in moe),
        norm_expert_weight=bool(c.get("norm_expert_weight", False)),
        vocab_size=int(c["vocab_size"]),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta),
    )


# ----------------------------------------------------------------------------- random weights (§3)
def random_hub_state(raw_config: dict, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random text tensors with the exact Hub names and ``[out, in]`` shapes of spec §3."""
    cfg = parse_config(raw_config)
    rng = np.random.default_rng(seed)
    H, V, Q = cfg["hidden_size"], cfg["vocab_size"], cfg["share_q_dim"]
    n, G, d = cfg["num_attention_heads"], cfg["num_attention_groups"], cfg["head_dim"]
    E, Fe, Fs, Fd = (cfg["moe_num_experts"], cfg["moe_intermediate_size"],
                     cfg["share_expert_dim"], cfg["intermediate_size"])

    def mat(*shape, std=None):  # N(0, 1/fan_in) unless told otherwise
        return rng.standard_normal(shape) * (std if std is not None else 1 / math.sqrt(shape[-1]))

    def norm(size):  # 1 + 0.1 N(0,1): a `1 + w` bug cannot hide
        return 1.0 + 0.1 * rng.standard_normal(size)

    s = {"model.embed_tokens.weight": rng.standard_normal((V, H))}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = norm(H)
        s[p + "post_attention_layernorm.weight"] = norm(H)
        s[p + "self_attn.q_proj.weight"] = mat(Q, H)
        s[p + "self_attn.k_proj.weight"] = mat(G * d, H)
        s[p + "self_attn.v_proj.weight"] = mat(G * d, H)
        s[p + "self_attn.inter_norm.weight"] = norm(Q)
        s[p + "self_attn.wq.weight"] = mat(n * d, Q)
        s[p + "self_attn.o_proj.weight"] = mat(H, n * d)
        if i in cfg["moe_layers"]:
            s[p + "moe.gate.weight"] = mat(E, H, std=2 / math.sqrt(H))  # router, not flat
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
    return {k: v.astype(dtype) for k, v in s.items()}


# ----------------------------------------------------------------------------- sub-layers (§2)
def rms_norm(x, w, eps):
    """Spec §2: x / sqrt(mean(x^2) + eps) * w  (plain w, not 1 + w), over the last axis."""
    x = _f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * _f64(w)


def rope(x, positions, theta):
    """Spec §2 step 4: NeoX rotate-half RoPE over the full last dim d; x [..., T, d]."""
    x = _f64(x)
    d = x.shape[-1]
    inv_freq = float(theta) ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    ang = _f64(positions)[..., None] * inv_freq                            # [T, d/2]
    ang = np.concatenate([ang, ang], axis=-1)                               # [T, d]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _softmax(z, axis=-1):
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def mfa(x, layer_state: dict, cfg, positions):
    """Spec §2 MFA for one sequence x [T, H]; layer_state keys: q_proj, k_proj, v_proj,
    inter_norm, wq, o_proj.  One K/V head (per group) shared by all query heads, causal."""
    x = _f64(x)
    T = x.shape[0]
    n, G, d = cfg["num_attention_heads"], cfg["num_attention_groups"], cfg["head_dim"]
    W = {k: _f64(v) for k, v in layer_state.items()}
    q_lr = rms_norm(x @ W["q_proj"].T, W["inter_norm"], cfg["rms_norm_eps"])  # whole Q vector
    q = (q_lr @ W["wq"].T).reshape(T, n, d).transpose(1, 0, 2)               # [n, T, d]
    k = (x @ W["k_proj"].T).reshape(T, G, d).transpose(1, 0, 2)              # [G, T, d]
    v = (x @ W["v_proj"].T).reshape(T, G, d).transpose(1, 0, 2)
    q, k = rope(q, positions, cfg["rope_theta"]), rope(k, positions, cfg["rope_theta"])
    k, v = np.repeat(k, n // G, axis=0), np.repeat(v, n // G, axis=0)        # [n, T, d]
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)                         # [n, T, T]
    causal = np.tril(np.ones((T, T), dtype=bool))
    p = _softmax(np.where(causal, scores, -np.inf))
    o = (p @ v).transpose(1, 0, 2).reshape(T, n * d)
    return o @ W["o_proj"].T


def swiglu(x, gate, up, down):
    """Spec §2: down(silu(x @ gate.T) * (x @ up.T))."""
    x = _f64(x)
    g = x @ _f64(gate).T
    silu = g * 0.5 * (1.0 + np.tanh(0.5 * g))  # g * sigmoid(g), overflow-free
    return (silu * (x @ _f64(up).T)) @ _f64(down).T


def moe(x, router, gate_proj, up_proj, down_proj, top_k, norm_expert_weight):
    """Spec §2 routed MoE (shared expert NOT included): softmax over all experts, top-k of the
    probabilities (ties: lower expert index first), no renormalization unless asked."""
    x = _f64(x)
    probs = _softmax(x @ _f64(router).T)                                     # [T, E]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = sorted(range(probs.shape[1]), key=lambda e: (-probs[t, e], e))[:top_k]
        w = probs[t, chosen]
        if norm_expert_weight:
            w = w / w.sum()
        for wj, e in zip(w, chosen):
            out[t] += wj * swiglu(x[t:t + 1], gate_proj[e], up_proj[e], down_proj[e])[0]
    return out


def decoder_layer(x, state, layer_index, cfg, positions):
    """Spec §2 pre-norm decoder layer, reading Hub-named tensors from the full state dict."""
    p = f"model.layers.{layer_index}."
    eps = cfg["rms_norm_eps"]
    attn = {k: state[p + f"self_attn.{k}.weight"]
            for k in ("q_proj", "k_proj", "v_proj", "inter_norm", "wq", "o_proj")}
    h = _f64(x) + mfa(rms_norm(x, state[p + "input_layernorm.weight"], eps), attn, cfg, positions)
    y = rms_norm(h, state[p + "post_attention_layernorm.weight"], eps)
    if layer_index in cfg["moe_layers"]:
        m = p + "moe."
        ffn = moe(y, state[m + "gate.weight"], state[m + "gate_proj.weight"],
                  state[m + "up_proj.weight"], state[m + "down_proj.weight"],
                  cfg["moe_top_k"], cfg["norm_expert_weight"])
        s = p + "share_expert."
        ffn = ffn + swiglu(y, state[s + "gate_proj.weight"], state[s + "up_proj.weight"],
                           state[s + "down_proj.weight"])
    else:
        ffn = swiglu(y, state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"],
                     state[p + "mlp.down_proj.weight"])
    return h + ffn


# ----------------------------------------------------------------------------- model (§2)
def forward(state: dict, cfg: dict, token_ids) -> np.ndarray:
    """Full causal forward of one sequence, no cache: logits [T, vocab_size] float64."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    x = _f64(np.asarray(state["model.embed_tokens.weight"])[ids])  # plain lookup, no scaling
    positions = np.arange(ids.shape[0])
    for i in range(cfg["num_hidden_layers"]):
        x = decoder_layer(x, state, i, cfg, positions)
    x = rms_norm(x, state["model.norm.weight"], cfg["rms_norm_eps"])
    return x @ _f64(state["lm_head.weight"]).T


def log_probs(state, cfg, token_ids) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i = 1..T-1 (length T-1)."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    z = forward(state, cfg, ids)[:-1]
    z = z - np.max(z, axis=-1, keepdims=True)
    lp = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    return lp[np.arange(ids.shape[0] - 1), ids[1:]]


def greedy(state, cfg, prompt_ids, n_new) -> list[int]:
    """Greedy continuation (n_new new tokens), re-running the full forward every step."""
    ids = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    new = []
    for _ in range(n_new):
        nxt = int(np.argmax(forward(state, cfg, ids)[-1]))  # ties: lowest token id
        ids.append(nxt)
        new.append(nxt)
    return new


# ----------------------------------------------------------------------------- block FP8 (§3)
def dequant_block_fp8(w_fp8: np.ndarray, scale_inv: np.ndarray, block=(128, 128)) -> np.ndarray:
    """Spec §3: w = fp8 * scale per (128, 128) block (the "scale_inv" multiplies).  Ragged edge
    blocks use their own scale; any leading axes (e.g. experts) are looped over."""
    w = np.asarray(w_fp8)
    assert w.dtype == ml_dtypes.float8_e4m3fn, w.dtype
    scale = np.asarray(scale_inv, dtype=np.float32)
    bo, bi = block
    n_out, n_in = w.shape[-2:]
    nbo, nbi = -(-n_out // bo), -(-n_in // bi)
    assert scale.shape == w.shape[:-2] + (nbo, nbi), (scale.shape, w.shape)
    out = np.empty(w.shape, dtype=np.float32)
    for lead in np.ndindex(*w.shape[:-2]):
        for r in range(nbo):
            for c in range(nbi):
                rs, cs = slice(r * bo, (r + 1) * bo), slice(c * bi, (c + 1) * bi)
                out[lead + (rs, cs)] = w[lead + (rs, cs)].astype(np.float32) * scale[lead + (r, c)]
    return out
