"""Long context (issue 14): chunked prefill, the attention switch through the whole model, long
inputs from files, memory refused before the work, and a 65,536-token prompt end to end.

The kernel itself (blocked == plain, the float64 reference at thousands of tokens, skipped
blocks) is tested in tests/test_blocked_attention.py; here the model around it.
"""

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.analysis import deployment, plan, preflight
from step3_jax.checkpoint.hub import load_hub
from step3_jax.checkpoint.loader import load
from step3_jax.model import attention, decoder
from step3_jax.model.blocked_attention import blocked_working_set_bytes
from step3_jax.model.config import from_hub_dict
from step3_jax.model.sharding import parse_mesh
from step3_jax.runtime.generate import Generator, generate, score

import reference as ref
from conftest import ROOT, run_cli, write_hub_checkpoint

# float32 through 4 layers, the same sums in another order (chunks, key blocks): observed
# <= 2e-6 on logits of size ~3; 2e-5 leaves an order of magnitude.
ATOL = 2e-5
_prefill = jax.jit(decoder.prefill, static_argnums=(3, 4, 5))


def _prompts(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, cfg.vocab_size, n).tolist() for n in lengths]


def _padded(prompts, width):
    tokens = np.zeros((len(prompts), width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


@pytest.mark.parametrize("impl,chunk", [("plain", 64), ("blocked", 64), ("blocked", 48),
                                        ("blocked", None)])
def test_chunked_prefill_equals_the_whole_prompt(tiny_params, tiny_cfg, impl, chunk):
    """Logits at each prompt's last token and every cached K/V agree with the plain whole-prompt
    prefill, for a ragged batch whose lengths the chunk does not divide (48 does not divide the
    192-token padding either: the prompt is padded to whole chunks, 192 = 4 x 48)."""
    prompts = _prompts(tiny_cfg, (192, 50, 7, 131))
    tokens, lengths = _padded(prompts, 192)
    want, want_cache = _prefill(tiny_params, tokens, lengths, 256,
                                tiny_cfg.replace(attention_impl="plain"), None)
    got, cache = _prefill(tiny_params, tokens, lengths, 256, tiny_cfg.replace(attention_impl=impl),
                          chunk)
    v = tiny_cfg.vocab_size
    np.testing.assert_allclose(np.asarray(got)[:, :v], np.asarray(want)[:, :v], atol=ATOL)
    np.testing.assert_array_equal(cache.lengths, want_cache.lengths)
    for a, b in zip(cache.v + cache.k, want_cache.v + want_cache.k):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL)


def test_decode_blocked_equals_plain(tiny_params, tiny_cfg):
    """One decode step over a ragged cache (lengths 5..200 of 256 slots): the blocked kernel,
    which reads only each row's filled blocks, gives the plain product's logits."""
    prompts = _prompts(tiny_cfg, (200, 5, 64, 129), seed=1)
    tokens, lengths = _padded(prompts, 256)
    _, cache = _prefill(tiny_params, tokens, lengths, 256, tiny_cfg, None)
    step = jnp.asarray([[3], [4], [5], [6]], jnp.int32)
    out = {}
    for impl in ("plain", "blocked"):
        cfg = tiny_cfg.replace(attention_impl=impl)
        logits, _ = jax.jit(decoder.forward, static_argnums=3)(tiny_params, step, cache, cfg)
        out[impl] = np.asarray(logits)[:, 0, : tiny_cfg.vocab_size]
    np.testing.assert_allclose(out["blocked"], out["plain"], atol=ATOL)


def test_generate_with_chunks_and_blocks_gives_the_same_tokens(tiny_params, tiny_cfg):
    prompts = _prompts(tiny_cfg, (150, 40, 77, 9), seed=2)
    want, _ = generate(tiny_params, tiny_cfg.replace(attention_impl="plain"), prompts,
                       max_new_tokens=8, prefill_chunk=0)
    got, metrics = generate(tiny_params, tiny_cfg.replace(attention_impl="blocked"), prompts,
                            max_new_tokens=8, prefill_chunk=32)
    assert [r.generated_ids for r in got] == [r.generated_ids for r in want]
    assert metrics["prefill_chunk"] == 32 and metrics["prefill_bucket"] == 256


def test_sharded_blocked_attention_equals_one_device(tiny_cfg, hub_dir):
    """Under dp and tp the blocked kernel runs inside shard_map on each device's sequences and
    heads; tokens equal the single-device plain run."""
    params, cfg = load(hub_dir, dtype="float32", progress=False)
    prompts = _prompts(cfg, (150, 40, 77, 9), seed=3)
    want, _ = generate(params, cfg.replace(attention_impl="plain"), prompts, max_new_tokens=6)
    sharded, scfg = load(hub_dir, dtype="float32", progress=False, attention_impl="blocked",
                         mesh=parse_mesh("dp=2,tp=2,ep=2"))
    got, _ = generate(sharded, scfg, prompts, max_new_tokens=6, prefill_chunk=32)
    assert [r.generated_ids for r in got] == [r.generated_ids for r in want]


def test_chunked_score_equals_the_whole_forward(tiny_params, tiny_cfg):
    ids = _prompts(tiny_cfg, (300,), seed=4)[0]
    whole = np.asarray(score(tiny_params, tiny_cfg, ids, prefill_chunk=0))
    chunked = np.asarray(score(tiny_params, tiny_cfg, ids, prefill_chunk=64))
    assert whole.shape == chunked.shape == (299,)
    np.testing.assert_allclose(chunked, whole, atol=ATOL)


def test_prefill_inside_a_bucket_reuses_one_program(tiny_params, tiny_cfg):
    """Two prompt lengths in one bucket and chunking: one prefill and one decode executable."""
    gen = Generator(tiny_params, tiny_cfg, prefill_chunk=32)
    for n in (130, 200):
        gen(_prompts(tiny_cfg, (n,), seed=n), max_new_tokens=4)
    assert len(gen._compiled) == 2


# ----- a 65,536-token prompt on a small model -----------------------------------------------------

def _last_logits_reference(state, cfg, ids):
    """Float64 logits at the last position of a one-layer model, attending over every earlier
    token: only the last query is formed, so 65,536 keys cost one [heads, T] score row."""
    x = np.asarray(state["model.embed_tokens.weight"], np.float64)[ids]
    p, eps, n, d = "model.layers.0.", cfg["rms_norm_eps"], cfg["num_attention_heads"], \
        cfg["head_dim"]
    w = {k: np.asarray(state[p + f"self_attn.{k}.weight"], np.float64)
         for k in ("q_proj", "k_proj", "v_proj", "inter_norm", "wq", "o_proj")}
    xn = ref.rms_norm(x, state[p + "input_layernorm.weight"], eps)
    T = len(ids)
    k = ref.rope((xn @ w["k_proj"].T)[None], np.arange(T), cfg["rope_theta"])[0]   # [T, d]
    v = xn @ w["v_proj"].T
    q_lr = ref.rms_norm(xn[-1:] @ w["q_proj"].T, w["inter_norm"], eps)
    q = ref.rope((q_lr @ w["wq"].T).reshape(1, n, d).transpose(1, 0, 2), np.array([T - 1]),
                 cfg["rope_theta"])[:, 0]                                            # [n, d]
    s = q @ k.T / math.sqrt(d)
    prob = np.exp(s - s.max(axis=-1, keepdims=True))
    prob /= prob.sum(axis=-1, keepdims=True)
    h = x[-1:] + ((prob @ v).reshape(1, n * d) @ w["o_proj"].T)
    y = ref.rms_norm(h, state[p + "post_attention_layernorm.weight"], eps)
    m, s_ = p + "moe.", p + "share_expert."
    ffn = ref.moe(y, state[m + "gate.weight"], state[m + "gate_proj.weight"],
                  state[m + "up_proj.weight"], state[m + "down_proj.weight"], cfg["moe_top_k"],
                  cfg["norm_expert_weight"])
    ffn += ref.swiglu(y, state[s_ + "gate_proj.weight"], state[s_ + "up_proj.weight"],
                      state[s_ + "down_proj.weight"])
    out = ref.rms_norm(h + ffn, state["model.norm.weight"], eps)
    return (out @ np.asarray(state["lm_head.weight"], np.float64).T)[0]


def test_a_65536_token_prompt_generates_and_matches_the_reference(tmp_path, tiny_raw):
    """A one-layer MoE model (tiny's widths) with room for 65,536 + 64 positions: the prompt is
    prefilled in 4096-token chunks by the blocked kernel (the plain product would need a
    [65536, 4, 65536] float32 score array, 69 GB), its last-token logits match a float64
    last-query reference, and greedy decoding continues over the 65,536-slot cache (generate's
    prefill and decode steps; that they equal ``generate`` is tested above on short prompts,
    one 65K prefill is what this machine affords). Float32 over 65,536 keys: the softmax sums
    65,536 terms, observed ~1e-5 on logits of size ~3; 1e-4 leaves room."""
    raw = {**tiny_raw, "num_hidden_layers": 1, "moe_layers_enum": "0",
           "max_position_embedding": 65536 + 64}
    state = ref.random_hub_state(raw, seed=3)
    cfg = from_hub_dict(raw, name="long")
    params = load_hub(write_hub_checkpoint(tmp_path / "hub", raw, state), cfg, progress=False)
    ids = np.random.default_rng(5).integers(2, cfg.vocab_size, 65536).tolist()
    logits, cache = _prefill(params, jnp.asarray([ids], jnp.int32),
                             jnp.asarray([65536], jnp.int32), 65536 + 64, cfg, 4096)
    want = _last_logits_reference(state, ref.parse_config(raw), np.asarray(ids))
    np.testing.assert_allclose(np.asarray(logits)[0, : cfg.vocab_size], want, atol=1e-4)
    step = jax.jit(decoder.forward, static_argnums=3)
    tokens = [int(np.argmax(np.asarray(logits)[0]))]
    assert tokens[0] == int(np.argmax(want))
    for _ in range(3):
        logits, cache = step(params, jnp.asarray([[tokens[-1]]], jnp.int32), cache, cfg)
        tokens.append(int(np.argmax(np.asarray(logits)[0, 0])))
    assert int(cache.lengths[0]) == 65536 + 3 and all(0 <= t < cfg.vocab_size for t in tokens)


# ----- memory, planned before the work -------------------------------------------------------------

def test_the_plan_counts_the_blocked_working_set(tiny_cfg):
    """Where auto picks the blocked kernel, the plan counts its tile, not [b, heads, context]."""
    cfg = tiny_cfg.replace(max_position_embedding=65536)
    b, heads, context = 64, cfg.num_attention_heads, 65536
    assert attention.resolve_impl(cfg, b, 1, heads, context) == "blocked"
    got = plan.attention_layer_bytes(cfg, b, heads, context, 4)
    tile = blocked_working_set_bytes(b, 1, heads, cfg.head_dim, context, itemsize=4)
    assert tile < got < tile + b * 4 * (cfg.share_q_dim + 2 * heads * cfg.head_dim
                                        + 2 * cfg.head_dim + cfg.hidden_size) + 1
    assert got < b * heads * context * 4 / 100  # a hundredth of one plain score array
    small = plan.attention_layer_bytes(cfg, 1, heads, 64, 4)
    assert attention.resolve_impl(cfg, 1, 1, heads, 64) == "plain"
    assert small >= 1 * heads * 64 * (3 * 4 + 4)  # the plain product's score arrays


def test_preflight_bounds_the_compiled_prefill(tiny_params, tiny_cfg):
    """The preflight's activation figure for a chunked prefill is not below what XLA actually
    allocates for that program (its temporaries), and not wildly above (4x)."""
    cfg = tiny_cfg
    tokens, lengths = _padded(_prompts(cfg, (256, 100)), 256)
    compiled = _prefill.lower(tiny_params, tokens, lengths, 256, cfg, 64).compile()
    temps = compiled.memory_analysis().temp_size_in_bytes
    need = preflight.requirement(cfg, deployment.Placement(), batch=2, piece=64, capacity=256)
    acts = need["colocated"]["activations"]
    assert temps <= acts <= 4 * temps, (temps, acts)


def test_memory_that_cannot_fit_is_refused_before_the_work(capsys, monkeypatch, tmp_path):
    code, out, err = run_cli(capsys, "generate", "--config", "step3", "--prompt-ids", "1,2,3")
    assert code == 2 and out == ""
    assert err.startswith("step3-jax: error: 1 prompt of up to 3 tokens + 32 new needs ")
    assert "mostly weights" in err and len(err.strip().splitlines()) == 1
    # Long prompts on the bench shapes: the KV cache is what cannot fit (64 x 61,440 positions
    # x 10 layers x 2 x 128 float32 values = 40 GB) on a machine with 20 GB.
    raw = json.loads((ROOT / "configs" / "bench.json").read_text())
    (tmp_path / "long.json").write_text(json.dumps({**raw, "max_position_embedding": 65536}))
    monkeypatch.setattr(preflight, "host_available", lambda: 20 * 10**9)
    code, _, err = run_cli(capsys, "bench", "--config", str(tmp_path / "long.json"),
                           "--prompt-len", "60000", "--new-tokens", "8", "--batch", "64")
    assert code == 2 and "64 prompts of up to 60,000 tokens + 8 new needs" in err
    assert "mostly kv cache); this machine has 20.0 GB available" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_unforeseen_out_of_memory_is_one_line(capsys, monkeypatch):
    from step3_jax.runtime import generate as gen

    def boom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 34514549064 bytes.\n"
                           "more lines")

    monkeypatch.setattr(gen.Generator, "__call__", boom)
    code, out, err = run_cli(capsys, "generate", "--config", "tiny", "--prompt-ids", "1,2", "-q")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "step3-jax: error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating "
        "34514549064 bytes.); lower --prefill-chunk, the batch or the context, or use more "
        "devices"]


# ----- long inputs from files -----------------------------------------------------------------------

def test_prompts_from_files(capsys, tmp_path, monkeypatch):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("5, 6 7\n8\t9,\n")
    code, out, _ = run_cli(capsys, "generate", "--config", "tiny", "--prompt-ids", "5,6,7,8,9",
                           "--prompt-ids-file", str(ids_file), "--max-new-tokens", "3", "--json")
    assert code == 0
    results = json.loads(out)["results"]
    assert results[1]["prompt_ids"] == [5, 6, 7, 8, 9]
    assert results[1]["generated_ids"] == results[0]["generated_ids"]
    monkeypatch.setattr("sys.stdin", io.StringIO("5 6 7 8 9"))
    code, out, _ = run_cli(capsys, "score", "--config", "tiny", "--ids-file", "-", "--json")
    assert code == 0 and json.loads(out)["ids"] == [5, 6, 7, 8, 9]


def test_text_files_score_like_inline_text(capsys, tmp_path):
    text = "def f(x):\n    return x\n"
    (tmp_path / "t.py").write_text(text)
    _, inline, _ = run_cli(capsys, "score", "--text", text, "--json", "-q")
    code, from_file, _ = run_cli(capsys, "score", "--text-file", str(tmp_path / "t.py"),
                                 "--json", "-q")
    assert code == 0 and json.loads(from_file) == json.loads(inline)
    code, out, _ = run_cli(capsys, "generate", "--prompt-file", str(tmp_path / "t.py"),
                           "--max-new-tokens", "4", "-q")
    assert code == 0 and out.startswith(f"[0] <{tmp_path / 't.py'}> (")


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt-ids-file", "/nonexistent/ids"],
     "--prompt-ids-file /nonexistent/ids: cannot read (No such file or directory)"),
    (["generate", "--prompt-ids-file", "BAD"], "--prompt-ids-file BAD: '1x' is not a token id"),
    (["generate", "--prompt-ids-file", "EMPTY"], "--prompt-ids-file EMPTY: the file is empty"),
    (["generate", "--prompt-ids-file", "-", "--prompt-file", "-"],
     "'-' (standard input) can be given to only one file flag, once"),
    (["score", "--ids", "1,2", "--ids-file", "BAD"], "give exactly one of --ids 1,2,3"),
    (["generate", "--prompt-ids", "1", "--prefill-chunk", "-1"], "--prefill-chunk must be >= 0"),
])
def test_bad_long_inputs_are_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD").write_text("1, 1x, 2")
    (tmp_path / "EMPTY").write_text("")
    code, out, err = run_cli(capsys, *argv, "--config", "tiny")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("step3-jax: error: ") and message in err
