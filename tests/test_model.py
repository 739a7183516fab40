"""End-to-end model checks: the NumPy reference, and the cache/decode consistency properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.errors import Step3Error
from step3_jax.model import decoder
from step3_jax.model.cache import init_cache
from step3_jax.runtime.generate import Generator, generate

import reference as ref

# float32 vs the float64 reference through 4 layers: observed ~2e-6 on logits of size ~3.
ATOL = 2e-4
PROMPTS = [[3, 17, 42], [5, 6, 7, 8, 9, 10, 11], [200, 1, 99, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                    13, 14, 15, 16, 17]]
_forward = jax.jit(decoder.forward, static_argnums=3)


def full_logits(params, cfg, ids):
    logits, _ = _forward(params, jnp.asarray([ids]), None, cfg)
    return np.asarray(logits[0])


def test_forward_matches_reference_end_to_end(tiny_params, tiny_cfg, tiny_raw, hub_state):
    ids = [3, 17, 42, 99, 5, 200, 7, 249, 0, 1]
    want = ref.forward(hub_state, ref.parse_config(tiny_raw), ids)
    got = full_logits(tiny_params, tiny_cfg, ids)
    np.testing.assert_allclose(got[:, : tiny_cfg.vocab_size], want, atol=ATOL)


def test_vocab_padding_is_masked(tiny_params, tiny_cfg):
    """Pitfall 5: padded vocabulary entries are -inf, never sampled."""
    got = full_logits(tiny_params, tiny_cfg, [1, 2, 3])
    assert got.shape[-1] == tiny_cfg.padded_vocab
    assert np.all(np.isneginf(got[:, tiny_cfg.vocab_size:]))
    assert np.all(np.isfinite(got[:, : tiny_cfg.vocab_size]))


def test_lm_head_is_untied(tiny_params):
    """Pitfall 5: lm_head is its own tensor, not the embedding transposed."""
    assert tiny_params.lm_head is not None
    assert not np.allclose(np.asarray(tiny_params.lm_head), np.asarray(tiny_params.embed))


def test_prefill_then_decode_equals_full_forward(tiny_params, tiny_cfg):
    """A ragged batch: prefill each prompt, then feed the rest one token (and one chunk) at a time."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 250, size=n).tolist() for n in (4, 9, 13)]
    prompt_lens = np.array([2, 6, 5])
    chunk = 16
    tokens = np.zeros((3, chunk), np.int32)
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
        tokens[b, :n] = s[:n]
    logits, cache = jax.jit(decoder.prefill, static_argnums=(3, 4))(
        tiny_params, jnp.asarray(tokens), jnp.asarray(prompt_lens, jnp.int32), 32, tiny_cfg)
    for b, s in enumerate(seqs):
        want = full_logits(tiny_params, tiny_cfg, s)
        np.testing.assert_allclose(logits[b], want[prompt_lens[b] - 1], atol=1e-4)
    # Decode: one token per step for every sequence still having tokens to feed.
    pos = prompt_lens.copy()
    for _ in range(3):
        step = np.array([[s[p] if p < len(s) else 0] for s, p in zip(seqs, pos)], np.int32)
        num_new = np.array([1 if p < len(s) else 0 for s, p in zip(seqs, pos)], np.int32)
        logits, cache = _forward(tiny_params, jnp.asarray(step), cache, tiny_cfg,
                                 jnp.asarray(num_new))
        for b, s in enumerate(seqs):
            if num_new[b]:
                np.testing.assert_allclose(logits[b, 0], full_logits(tiny_params, tiny_cfg, s)[pos[b]],
                                           atol=1e-4)
        pos += num_new
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos)
    # A multi-token chunk appended to the cache (chunked continuation).
    rest = [s[p:] for s, p in zip(seqs, pos)]
    width = max(len(r) for r in rest)
    chunk_tokens = np.array([r + [0] * (width - len(r)) for r in rest], np.int32)
    logits, cache = _forward(tiny_params, jnp.asarray(chunk_tokens), cache, tiny_cfg,
                             jnp.asarray([len(r) for r in rest], jnp.int32))
    for b, (s, r) in enumerate(zip(seqs, rest)):
        want = full_logits(tiny_params, tiny_cfg, s)[pos[b]:]
        np.testing.assert_allclose(logits[b, : len(r)], want, atol=1e-4)


def test_greedy_equals_teacher_forcing_and_reference(tiny_params, tiny_cfg, tiny_raw, hub_state):
    results, _ = generate(tiny_params, tiny_cfg, PROMPTS, max_new_tokens=8, eos_ids=[])
    for prompt, r in zip(PROMPTS, results):
        assert r.finish_reason == "length" and len(r.generated_ids) == 8
        logits = full_logits(tiny_params, tiny_cfg, prompt + r.generated_ids)
        forced = logits[len(prompt) - 1: -1].argmax(-1).tolist()
        assert forced == r.generated_ids
    want = ref.greedy(hub_state, ref.parse_config(tiny_raw), PROMPTS[0], 8)
    assert results[0].generated_ids == list(want)


def test_ragged_batch_equals_one_by_one(tiny_params, tiny_cfg):
    gen = Generator(tiny_params, tiny_cfg)
    batched, _ = gen(PROMPTS, max_new_tokens=10, eos_ids=[])
    for prompt, r in zip(PROMPTS, batched):
        (alone,), _ = gen([prompt], max_new_tokens=10, eos_ids=[])
        assert alone.generated_ids == r.generated_ids


def test_cache_write_past_capacity_is_dropped_not_clamped(tiny_params, tiny_cfg):
    """Pitfall 6: dynamic_update_slice would clamp and overwrite the last slots; we drop."""
    cache = init_cache(tiny_cfg, batch=1, capacity=8)
    k_marker = tuple(k.at[:, :, :7].set(1.0) for k in cache.k)  # K: [batch, d, capacity]
    v_marker = tuple(v.at[:, :7].set(1.0) for v in cache.v)     # V: [batch, capacity, d]
    cache = cache.replace(k=k_marker, v=v_marker, lengths=jnp.asarray([7], jnp.int32))
    _, out = _forward(tiny_params, jnp.asarray([[4, 5, 6]]), cache, tiny_cfg)
    k = np.stack([np.asarray(a) for a in out.k]).swapaxes(-1, -2)  # [layers, batch, cap., d]
    v = np.stack([np.asarray(a) for a in out.v])
    for arr in (k, v):
        assert np.all(arr[:, :, :7] == 1.0)  # earlier slots untouched
        assert not np.all(arr[:, :, 7] == 0.0)  # the one slot that fits was written
    assert int(out.lengths[0]) == 8


def test_generation_stops_cleanly_at_the_context_end(tiny_params, tiny_cfg):
    cfg = tiny_cfg.replace(max_position_embedding=20)
    prompt = list(range(10, 25))
    (r,), metrics = generate(tiny_params, cfg, [prompt], max_new_tokens=10, eos_ids=[])
    assert metrics["cache_capacity"] == 20
    # Positions 15..19 can be fed: 5 fed tokens + the one sampled from the prefill.
    assert r.finish_reason == "capacity" and len(r.generated_ids) == 6
    forced = full_logits(tiny_params, cfg, prompt + r.generated_ids)[14:-1].argmax(-1).tolist()
    assert forced == r.generated_ids
    with pytest.raises(Step3Error, match="prompt 0 has 21 tokens, longer than the context"):
        generate(tiny_params, cfg, [list(range(21))], max_new_tokens=1)


@pytest.mark.parametrize("eos", [[250], [3, -1], [3, 99999]])
def test_a_stop_id_outside_the_vocabulary_is_refused(tiny_params, tiny_cfg, eos):
    """Issue 17: such an id can never stop a sequence; refused before anything compiles.
    ``-1`` is refused too unless it stands alone (``--eos-id -1``: no stop token)."""
    with pytest.raises(Step3Error, match=rf"--eos-id {eos[-1]} is outside the vocabulary "
                                         r"\(0..249\)"):
        generate(tiny_params, tiny_cfg, [[1, 2]], max_new_tokens=2, eos_ids=eos)


def test_eos_minus_one_alone_means_no_stop_token(tiny_params, tiny_cfg):
    (r,), _ = generate(tiny_params, tiny_cfg, [[1, 2]], max_new_tokens=3, eos_ids=[-1])
    assert r.finish_reason == "length" and len(r.generated_ids) == 3


def test_eos_stops_one_sequence_and_not_the_others(tiny_params, tiny_cfg):
    base, _ = generate(tiny_params, tiny_cfg, PROMPTS[:2], max_new_tokens=8, eos_ids=[])
    eos = base[0].generated_ids[2]
    assert eos not in base[1].generated_ids[:8], "pick prompts whose outputs differ"
    results, _ = generate(tiny_params, tiny_cfg, PROMPTS[:2], max_new_tokens=8, eos_ids=[eos])
    cut = base[0].generated_ids.index(eos) + 1
    assert results[0].generated_ids == base[0].generated_ids[:cut]
    assert results[0].finish_reason == "eos"
    assert results[1].generated_ids == base[1].generated_ids and results[1].finish_reason == "length"


def test_no_recompile_inside_a_bucket(tiny_params, tiny_cfg):
    gen = Generator(tiny_params, tiny_cfg)
    _, first = gen([[1, 2, 3]], max_new_tokens=5)
    _, second = gen([[4, 5, 6, 7, 8, 9]], max_new_tokens=9, temperature=0.7, top_k=5)
    assert first["compile_s"] > 0 and second["compile_s"] == 0.0
    assert len(gen._compiled) == 2  # one prefill and one decode executable


def test_buckets_bound_the_padding():
    """Up to 256 a power of two; above, under 256 positions or 12.5% of padding (the decode
    attention reads the whole capacity: a power of two read 2x the context at 4096 + 32)."""
    from step3_jax.model.config import load_config
    from step3_jax.runtime.generate import bucket, shape_buckets

    sizes = [bucket(n, 16) for n in range(1, 20_000)]
    for n, b in enumerate(sizes, start=1):
        if n <= 256:
            assert b >= n and b & (b - 1) == 0, n
        else:
            assert n <= b < n + max(256, n / 8), n
    assert sizes == sorted(sizes)
    assert len(set(sizes[4096:8192])) == 8  # 8 buckets per doubling from 4096 on
    cfg = load_config("bench")
    assert shape_buckets(4096, 32, cfg) == (4096, 4608)
    assert shape_buckets(128, 32, cfg) == (128, 256)
    # Every prompt length inside a bucket gets the same capacity: one decode loop for all of them.
    assert {shape_buckets(n, 32, cfg) for n in range(1025, 1281)} == {(1280, 1536)}
    assert shape_buckets(8000, 500, cfg) == (8192, 8192)  # capped at the context


def test_tensor_parallel_weights_generate_the_same_tokens(hub_dir, tiny_params, tiny_cfg):
    """Weights placed by the rules table on a tp=2 mesh: the decode loop follows their mesh."""
    from step3_jax.checkpoint.loader import load
    from step3_jax.model.sharding import make_mesh

    mesh = make_mesh(tp=2)
    params, cfg = load(hub_dir, progress=False,
                       mesh=mesh)
    sharded, _ = generate(params, cfg, PROMPTS, max_new_tokens=6, eos_ids=[])
    single, _ = generate(tiny_params, tiny_cfg, PROMPTS, max_new_tokens=6, eos_ids=[])
    assert [r.generated_ids for r in sharded] == [r.generated_ids for r in single]


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_never_copies_the_kv_cache(tiny_params, tiny_cfg, batch):
    """The cache is updated in place: no op of the compiled decode loop copies a whole K or V
    cache. (At batch 1 XLA:CPU rewrote the one-update scatter into a select + dynamic-update-slice
    that read the old cache, and copied every layer's K and V four times per step: 35.0 vs
    29.4 ms per step on ``bench`` at context 1024.)"""
    import re

    from step3_jax.model.cache import layer_shapes

    gen = Generator(tiny_params, tiny_cfg)
    _, metrics = gen([list(range(1, 6))] * batch, max_new_tokens=3)
    (executable,) = [v for k, v in gen._compiled.items() if k[0] == "decode"]
    shapes = {f"f32[{','.join(map(str, s))}]"
              for s in layer_shapes(tiny_cfg, batch, metrics["cache_capacity"])}
    copied = re.findall(r"= (f32\[[\d,]+\])\{[\d,]+\} copy\(", executable.as_text())
    assert shapes and not shapes & set(copied)
