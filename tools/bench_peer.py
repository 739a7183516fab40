#!/usr/bin/env python
"""The eager-PyTorch peer: Step-3 written the way the Hub remote code writes it, verified, timed.

What the peer is (``shared/spec/model.md`` §2, in the style of the Hub's ``modeling_step3``):
torch-layout ``[out, in]`` weights applied with ``F.linear``; MFA as ``q_proj`` -> ``inter_norm``
-> ``wq``, the single K/V head repeated to every query head (``repeat_kv``: ``expand`` +
``reshape``, a copy), NeoX rotate-half RoPE, eager ``matmul`` / float32 ``softmax`` / ``matmul``
attention, a KV cache grown with ``torch.cat`` at every step; the MoE as a softmax router, top-k
without renormalisation, a Python loop over all experts (``torch.where`` on the one-hot expert
mask, the expert's SwiGLU, ``index_add_``) plus the shared expert; a dense SwiGLU in the dense
layers. Float32, ``torch.inference_mode()``, ``torch.set_num_threads`` = the cores JAX uses.
The weights are ours, as ``step3_jax.checkpoint.to_hub`` gives them (what the Hub code loads).

Before any time is reported the peer is checked against our model on the same weights and prompts
(:func:`verify`): logits of the prompt (every position), then a few greedy decode steps, whose
logits must match ours (:data:`LOGIT_TOL`) and whose greedy tokens must be ours. A mismatch raises
:class:`PeerMismatch` and nothing is timed.

Timing (:func:`time_decode`): prefill of the batch's prompts, then ``new_tokens`` greedy decode
steps, each timed on its own; the decode step is the median over the timed steps of every run
after a warm-up run. Torch is a benchmark-only dependency (``pip install -e '.[peer]'``).

    python tools/bench_peer.py --config bench --batch 1 --prompt-len 128 --new-tokens 32
    python tools/bench_peer.py --config tiny --json       # one JSON document on stdout
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # a benchmark-only dependency: say how to get it
    torch = None

# Both sides are float32 but sum in different orders (XLA vs oneDNN/MKL, fused vs not): logits
# agree to ~1e-5 of their scale on the tiny and bench presets. A wrong formula (RoPE style,
# norm span, router renormalisation, a missing shared expert) moves them by O(1) of their scale.
LOGIT_TOL = 1e-3  # max |peer - ours| / max(1, max |ours|)


class PeerMismatch(RuntimeError):
    """The peer's logits or greedy tokens differ from ours: its timings would mean nothing."""


def require_torch() -> None:
    if torch is None:
        raise SystemExit("tools/bench_peer.py needs torch (benchmark-only): "
                         "pip install -e '.[peer]'")


def jax_threads() -> int:
    """The threads XLA:CPU runs on: one per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----- the model, eager, Hub style ------------------------------------------------------------------

def rms_norm(x, weight, eps):
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x, n_rep: int):
    """``[B, kv_heads, S, d]`` -> ``[B, kv_heads * n_rep, S, d]`` (a copy, as the Hub code does)."""
    b, kv, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class Peer:
    """Step-3 in eager PyTorch over Hub-named tensors (``to_hub`` / :func:`hub_tensors` output)."""

    def __init__(self, hub: dict, cfg):
        self.cfg = cfg
        t = {k: v if isinstance(v, (torch.Tensor, list)) else torch.from_numpy(np.array(v))
             for k, v in hub.items()}
        self.embed = t["model.embed_tokens.weight"]
        self.lm_head = t.get("lm_head.weight", self.embed)  # tied when there is no lm_head
        self.norm = t["model.norm.weight"]
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            pre = f"model.layers.{i}."
            self.layers.append({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)})
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.kv_heads = cfg.num_attention_groups
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64)
                                         .float() / cfg.head_dim))
        self.inv_freq = inv
        self.routing_log = None  # set to a list to record the distinct experts per MoE call

    def rope(self, positions):
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, d]

    def attention(self, p, x, cos, sin, past):
        b, t, _ = x.shape
        n, d, kvh = self.heads, self.head_dim, self.kv_heads
        q = rms_norm(F.linear(x, p["self_attn.q_proj.weight"]), p["self_attn.inter_norm.weight"],
                     self.cfg.rms_norm_eps)
        q = F.linear(q, p["self_attn.wq.weight"]).view(b, t, n, d).transpose(1, 2)
        k = F.linear(x, p["self_attn.k_proj.weight"]).view(b, t, kvh, d).transpose(1, 2)
        v = F.linear(x, p["self_attn.v_proj.weight"]).view(b, t, kvh, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:  # the concatenated cache, grown at every step
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        k, v = repeat_kv(k, n // kvh), repeat_kv(v, n // kvh)
        scores = torch.matmul(q, k.transpose(2, 3)) * (d ** -0.5)
        if t > 1:  # causal mask over the keys this chunk may see
            s = k.shape[2]
            future = torch.ones(t, s, dtype=torch.bool).triu(s - t + 1)
            scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, n * d)
        return F.linear(o, p["self_attn.o_proj.weight"]), present

    def moe(self, p, x):
        b, t, h = x.shape
        x = x.view(-1, h)
        probs = F.softmax(F.linear(x, p["moe.gate.weight"]), dim=1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.cfg.moe_top_k, dim=-1)
        if self.cfg.norm_expert_weight:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        if self.routing_log is not None:
            self.routing_log.append(int(torch.unique(experts).numel()))
        out = torch.zeros_like(x)
        mask = F.one_hot(experts, num_classes=self.cfg.moe_num_experts).permute(2, 1, 0)
        gate, up, down = (p[f"moe.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        for e in range(self.cfg.moe_num_experts):
            slot, rows = torch.where(mask[e])
            y = swiglu(x[rows], gate[e], up[e], down[e]) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(x.dtype))
        return out.view(b, t, h)

    def forward(self, tokens, cache=None, all_logits: bool = False):
        """Logits ``[B, T or 1, V]`` (float32) and the grown cache (a list of per-layer K, V)."""
        b, t = tokens.shape
        start = 0 if cache is None else cache[0][0].shape[2]
        positions = torch.arange(start, start + t).expand(b, t)
        cos, sin = self.rope(positions)
        x = F.embedding(tokens, self.embed)
        new_cache = []
        eps = self.cfg.rms_norm_eps
        for i, p in enumerate(self.layers):
            a, present = self.attention(p, rms_norm(x, p["input_layernorm.weight"], eps), cos, sin,
                                        None if cache is None else cache[i])
            new_cache.append(present)
            x = x + a
            y = rms_norm(x, p["post_attention_layernorm.weight"], eps)
            if i in self.cfg.moe_layers:
                shared = swiglu(y, p["share_expert.gate_proj.weight"],
                                p["share_expert.up_proj.weight"], p["share_expert.down_proj.weight"])
                x = x + (self.moe(p, y) + shared)
            else:
                x = x + swiglu(y, p["mlp.gate_proj.weight"], p["mlp.up_proj.weight"],
                               p["mlp.down_proj.weight"])
        x = rms_norm(x if all_logits else x[:, -1:], self.norm, eps)
        return F.linear(x, self.lm_head).float(), new_cache


def _hub_view(arr: np.ndarray, spec, cfg) -> np.ndarray:
    """``checkpoint.leaf_to_hub`` without its final copy: the Hub shape as a view of ``arr``."""
    arr = arr[tuple(slice(0, cfg.vocab_size) if a == "vocab" else slice(None) for a in spec.axes)]
    return arr.reshape(spec.hub_shape)


def hub_tensors(params, cfg) -> dict:
    """The Hub-named tensors of ``params`` as torch tensors sharing our weights' memory.

    Names, shapes and values are ``step3_jax.checkpoint.to_hub``'s (each weight's declaration gives
    its Hub name and transform). They are zero-copy views of our arrays, so a benchmark holds one
    copy of the weights, not two (this 24 GB machine is shared). Our weights are declared in the
    Hub ``[out, in]`` layout, so each view is a contiguous ``[out, in]`` tensor, as the Hub
    remote code's ``nn.Linear`` holds it. A stacked ``[E, out, in]`` expert tensor is a list of per-expert views, which ``weight[e]`` indexes exactly as it indexes the
    Hub's stacked parameter.
    """
    import warnings

    import jax

    from step3_jax.model.weights import declare, is_spec

    pairs = []
    jax.tree.map(lambda spec, value: pairs.append((spec, value)), declare(cfg), params,
                 is_leaf=is_spec)
    out = {}
    with warnings.catch_warnings():  # JAX's host arrays are read-only; the peer never writes
        warnings.simplefilter("ignore", UserWarning)
        for spec, value in pairs:
            if isinstance(value, (tuple, list)) or "expert_mlp" in spec.axes:
                one = dataclasses.replace(spec, shape=spec.shape[1:], axes=spec.axes[1:],
                                          hub_shape=spec.hub_shape[1:])
                experts = value if isinstance(value, (tuple, list)) else np.asarray(value)
                out[spec.hub] = [torch.from_numpy(_hub_view(np.asarray(w), one, cfg))
                                 for w in experts]
            else:
                out[spec.hub] = torch.from_numpy(_hub_view(np.asarray(value), spec, cfg))
    return out


def build(params, cfg, threads: int | None = None) -> Peer:
    """The peer on our ``params`` (any layout), with torch on ``threads`` threads (default: JAX's)."""
    require_torch()
    torch.set_num_threads(threads or jax_threads())
    if cfg.dtype != "float32":
        raise ValueError(f"the peer runs float32; got a {cfg.dtype} config")
    return Peer(hub_tensors(params, cfg), cfg)


def tile_cache(cache, batch: int):
    """One sequence's cache copied to ``batch`` rows (a shared prefix)."""
    return [(k.expand(batch, *k.shape[1:]).contiguous(), v.expand(batch, *v.shape[1:]).contiguous())
            for k, v in cache]


def greedy(peer: Peer, cache, first, steps: int, times: list | None = None):
    """Feed ``first [B]`` and ``steps - 1`` greedy tokens after it, one decode step each.

    Returns the tokens fed and produced ``[B, steps + 1]`` (``first`` included) and the cache;
    each step's wall time is appended to ``times``.
    """
    token = torch.as_tensor(np.asarray(first, np.int64))[:, None]
    out = [token]
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, cache = peer.forward(token, cache)
        token = logits[:, -1, : peer.cfg.vocab_size].argmax(-1, keepdim=True)
        if times is not None:
            times.append(time.perf_counter() - t0)
        out.append(token)
    return torch.cat(out, dim=1).numpy(), cache


# ----- verification against our model -------------------------------------------------------------

def _scaled_err(peer_logits: np.ndarray, ours: np.ndarray) -> float:
    return float(np.max(np.abs(peer_logits - ours)) / max(1.0, float(np.max(np.abs(ours)))))


def verify(peer: Peer, params, cfg, prompts, new_tokens: int = 4, tol: float = LOGIT_TOL) -> dict:
    """Check the peer against our model on ``prompts`` (equal lengths) and raise on a mismatch.

    Ours: greedy tokens from ``step3_jax.runtime.generate`` (the prefill and decode loop we time), and
    logits from one full causal ``step3_jax.forward`` over prompt + those tokens. The peer:
    prefill of the prompt (logits at every position), then ``new_tokens - 1`` decode steps through
    its concatenated cache fed with our tokens; each step's logits must match ours and its argmax
    must be our next token.
    """
    import jax
    import jax.numpy as jnp

    from step3_jax import forward, generate

    prompts = np.asarray(prompts, np.int64)
    batch, plen = prompts.shape
    results, _ = generate(params, cfg, prompts.tolist(), max_new_tokens=new_tokens, eos_ids=[])
    gen = np.asarray([r.generated_ids for r in results], np.int64)
    full = np.concatenate([prompts, gen[:, :-1]], axis=1)
    ours, _ = jax.jit(forward, static_argnums=(3,))(params, jnp.asarray(full, jnp.int32), None, cfg)
    ours = np.asarray(ours)[..., : cfg.vocab_size]

    with torch.inference_mode():
        logits, cache = peer.forward(torch.as_tensor(prompts), None, all_logits=True)
        prefill_err = _scaled_err(logits.numpy(), ours[:, :plen])
        peer_tokens = [logits[:, -1, : cfg.vocab_size].argmax(-1).numpy()]
        decode_err = 0.0
        for j in range(new_tokens - 1):
            step_logits, cache = peer.forward(torch.as_tensor(gen[:, j : j + 1]), cache)
            decode_err = max(decode_err, _scaled_err(step_logits[:, 0].numpy(), ours[:, plen + j]))
            peer_tokens.append(step_logits[:, 0, : cfg.vocab_size].argmax(-1).numpy())
    peer_tokens = np.stack(peer_tokens, axis=1)
    report = {"batch": batch, "prompt_len": plen, "decode_steps": new_tokens - 1,
              "tolerance": tol, "prefill_max_scaled_err": prefill_err,
              "decode_max_scaled_err": decode_err,
              "greedy_tokens_match": bool(np.array_equal(peer_tokens, gen)),
              "logit_scale": float(np.max(np.abs(ours)))}
    if prefill_err > tol or decode_err > tol or not report["greedy_tokens_match"]:
        raise PeerMismatch(
            f"the peer disagrees with step3_jax: prefill error {prefill_err:.2e}, decode error "
            f"{decode_err:.2e} (tolerance {tol:.0e}, scaled by max(1, max|logit|)), greedy "
            f"tokens {'match' if report['greedy_tokens_match'] else 'differ'}; no time reported")
    return report


# ----- timing ---------------------------------------------------------------------------------------

def time_decode(peer: Peer, prompts, new_tokens: int, repeats: int = 2, flush=None,
                log=None) -> dict:
    """Prefill ``prompts [B, T]`` and decode ``new_tokens`` greedy steps, ``repeats`` + 1 times.

    The first run is a warm-up (it also records the distinct experts the batch routes to). The
    decode step is the median over the timed steps of the other runs; the prefill the median of
    their prefill times. ``flush()`` runs before each run (a cache-eviction buffer).
    """
    log = log or (lambda *a: None)
    prompts = torch.as_tensor(np.asarray(prompts, np.int64))
    prefill_ms, steps_ms, tokens = [], [], None
    with torch.inference_mode():
        for r in range(repeats + 1):
            if flush is not None:
                flush()
            peer.routing_log = [] if r == 0 else None
            t0 = time.perf_counter()
            logits, cache = peer.forward(prompts, None)
            prefill = time.perf_counter() - t0
            first = logits[:, -1, : peer.cfg.vocab_size].argmax(-1)
            times = []
            tokens, cache = greedy(peer, cache, first, new_tokens - 1, times)
            if r == 0:
                routing = peer.routing_log
            else:
                prefill_ms.append(prefill * 1e3)
                steps_ms += [t * 1e3 for t in times]
            log(f"peer run {r + 1}/{repeats + 1}{' (warm-up)' if r == 0 else ''}: prefill "
                f"{prefill * 1e3:.1f} ms, decode {statistics.median(times) * 1e3:.2f} ms/step")
            del cache
    peer.routing_log = None
    batch = prompts.shape[0]
    step = statistics.median(steps_ms)
    return {"batch": batch, "prompt_len": prompts.shape[1], "new_tokens": new_tokens,
            "decode_step_ms": step, "decode_tokens_per_s": batch * 1e3 / step,
            "prefill_ms": statistics.median(prefill_ms), "repeats": repeats,
            "steps_ms": steps_ms, "tokens": tokens.tolist(),
            "distinct_experts_per_moe_call": routing_summary(routing, peer.cfg, prompts.shape)}


def routing_summary(counts: list[int], cfg, shape) -> dict | None:
    """Mean distinct experts per MoE layer, separately for the prefill and the decode steps."""
    n = len(cfg.moe_layers)
    if not counts or not n:
        return None
    return {"prefill": statistics.mean(counts[:n]),
            "decode": statistics.mean(counts[n:]) if len(counts) > n else None}


# ----- main -----------------------------------------------------------------------------------------

def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Time the eager-PyTorch peer of Step-3 (Hub remote-code style, float32) on "
                    "our weights, after checking its logits and greedy tokens against ours.")
    ap.add_argument("--config", default="bench", help="preset or config.json (default bench)")
    ap.add_argument("--seed", type=int, default=0, help="random weights and prompts")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up run")
    ap.add_argument("--threads", type=int, default=None,
                    help=f"torch threads (default: the cores JAX uses, {jax_threads()} here)")
    ap.add_argument("--verify-prompt-len", type=int, default=16,
                    help="the verification runs on the first tokens of the first two prompts")
    ap.add_argument("--verify-tokens", type=int, default=4, help="greedy tokens verified")
    ap.add_argument("--flush-mb", type=int, default=1024,
                    help="MiB rewritten before each run to evict the caches (0: no flush)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "repeats", "verify_prompt_len",
                 "verify_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    require_torch()

    import jax

    import step3_jax
    from step3_jax.runtime.bench import Flusher

    params, cfg = step3_jax.load(config=args.config, seed=args.seed, progress=False)
    if args.prompt_len + args.new_tokens > cfg.max_position_embedding:
        ap.error(f"--prompt-len + --new-tokens exceeds the context ({cfg.max_position_embedding})")
    peer = build(params, cfg, args.threads)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(2, cfg.vocab_size, size=(args.batch, args.prompt_len))
    vlen = min(args.verify_prompt_len, args.prompt_len)
    log(f"verifying the peer against step3_jax ({cfg.name}, {min(args.batch, 2)} prompts of "
        f"{vlen} tokens, {args.verify_tokens} greedy tokens)")
    try:
        check = verify(peer, params, cfg, prompts[:2, :vlen], args.verify_tokens)
    except PeerMismatch as e:
        log(f"error: {e}")
        return 1
    log(f"verified: prefill error {check['prefill_max_scaled_err']:.1e}, decode error "
        f"{check['decode_max_scaled_err']:.1e} (tolerance {check['tolerance']:.0e}), greedy "
        "tokens match")
    result = time_decode(peer, prompts, args.new_tokens, args.repeats, Flusher(args.flush_mb), log)
    result.pop("tokens")
    report = {"setting": {"config": cfg.name, "dtype": "float32", "torch": torch.__version__,
                          "jax": jax.__version__, "threads": torch.get_num_threads(),
                          "seed": args.seed},
              "verification": check, **result}
    log(f"peer ({cfg.name}, batch {args.batch}, prompt {args.prompt_len}): prefill "
        f"{result['prefill_ms']:.1f} ms, decode {result['decode_step_ms']:.2f} ms/step = "
        f"{result['decode_tokens_per_s']:.1f} tokens/s")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
