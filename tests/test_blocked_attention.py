"""Blocked (online-softmax) MFA attention against the full-score reference and a float64 NumPy one.

Tolerance: inputs are unit normals, so outputs are convex combinations of O(1) values. Both float32
kernels round every score and exp to 2^-24 relative; the blocked one also rescales its running sum
and accumulator once per key block, adding a few ulps per block. With at most tens of blocks the
disagreement stays ~1e-6 (measured: <= 1e-6); 2e-5 absolute leaves margin without hiding a
masking error, which moves outputs by O(0.1).
"""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.model.attention import plain_attend
from step3_jax.model.blocked_attention import (blocked_attend, blocked_attend_stats,
                                               blocked_working_set_bytes, plain_working_set_bytes)

ATOL = 2e-5


def make_inputs(seed, batch, t_len, n, d, s_cap, dtype=jnp.float32):
    """Random ``q [B, T, n, d]``, ``k_t [B, d, S]``, ``v [B, S, d]``."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, t_len, n, d))
    k_t = rng.standard_normal((batch, d, s_cap))
    v = rng.standard_normal((batch, s_cap, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k_t, v))


def has_visible(q_pos, key_len, window):
    """``[B, T]``: whether each query sees at least one key (the oldest one it may see)."""
    q_pos, key_len = np.asarray(q_pos), np.asarray(key_len)[:, None]
    oldest = 0 if window is None else np.maximum(q_pos - window + 1, 0)
    return (q_pos >= 0) & (oldest < key_len) & (oldest <= q_pos)


def check_against_plain(seed, batch, t_len, n, d, s_cap, q_pos, key_len, window, q_block,
                        k_block):
    q, k_t, v = make_inputs(seed, batch, t_len, n, d, s_cap)
    q_pos, key_len = jnp.asarray(q_pos, jnp.int32), jnp.asarray(key_len, jnp.int32)
    got = np.asarray(blocked_attend(q, k_t, v, q_pos, key_len, window=window,
                                    q_block=q_block, k_block=k_block))
    want = np.asarray(plain_attend(q, k_t, v, q_pos, key_len, window=window))
    assert got.shape == (batch, t_len, n, d) and got.dtype == np.float32
    assert np.isfinite(got).all()
    seen = has_visible(q_pos, key_len, window)
    np.testing.assert_allclose(got[seen], want[seen], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(got[~seen], 0.0)


def arange_rows(starts, t_len):
    return np.asarray(starts)[:, None] + np.arange(t_len)[None]


CASES = {
    # name: (batch, T, n, d, S, q_pos, key_len, window, q_block, k_block)
    "causal_prefill": (1, 200, 4, 32, 200, arange_rows([0], 200), [200], None, 32, 48),
    "causal_prefill_default_blocks": (2, 300, 2, 16, 300, arange_rows([0, 0], 300), [300, 300],
                                      None, None, None),
    "chunked_prefill": (2, 70, 4, 32, 384, arange_rows([150, 40], 70), [220, 110], None, 32, 64),
    "decode_ragged": (4, 1, 4, 32, 300, [[0], [36], [255], [299]], [1, 37, 256, 300], None, 1,
                      64),
    "ragged_batch": (3, 90, 2, 16, 160, arange_rows([0, 70, 10], 90), [90, 160, 40], None, 40,
                     56),
    "window_7": (1, 300, 2, 16, 300, arange_rows([0], 300), [300], 7, 64, 32),
    "window_64_chunk": (2, 100, 2, 16, 512, arange_rows([300, 0], 100), [400, 100], 64, 48, 80),
    "blocks_larger_than_inputs": (1, 20, 2, 16, 30, arange_rows([10], 20), [30], None, 128, 512),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocked_matches_plain(name):
    check_against_plain(zlib.crc32(name.encode()), *CASES[name])


def test_row_without_visible_key_is_finite_zero():
    q, k_t, v = make_inputs(1, 2, 8, 2, 16, 64)
    q_pos = jnp.asarray([np.arange(8), np.arange(8) + 40], jnp.int32)
    key_len = jnp.asarray([0, 64], jnp.int32)  # row 0: an empty cache
    for window in (None, 4):
        out = np.asarray(blocked_attend(q, k_t, v, q_pos, key_len, window=window,
                                        q_block=4, k_block=16))
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[0], 0.0)
        assert np.abs(out[1]).max() > 0
    assert np.isfinite(np.asarray(plain_attend(q, k_t, v, q_pos, key_len))).all()


def test_bfloat16_inputs():
    q, k_t, v = make_inputs(2, 1, 64, 2, 16, 64, dtype=jnp.bfloat16)
    q_pos, key_len = jnp.arange(64, dtype=jnp.int32)[None], jnp.asarray([64], jnp.int32)
    got = blocked_attend(q, k_t, v, q_pos, key_len, q_block=16, k_block=16)
    want = plain_attend(q, k_t, v, q_pos, key_len)
    assert got.dtype == jnp.bfloat16
    # bfloat16 probabilities and output: 2^-8 relative rounding on O(1) values.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=3e-2)


def numpy_reference(q, k_t, v, q_pos, key_len, window):
    """Float64 attention straight from the definition, one batch row and head at a time."""
    q, k_t, v = (np.asarray(x, np.float64) for x in (q, k_t, v))
    batch, t_len, n, d = q.shape
    out = np.zeros_like(q)
    s_pos = np.arange(k_t.shape[-1])
    for b in range(batch):
        qp = np.asarray(q_pos)[b][:, None]
        mask = (s_pos[None] < key_len[b]) & (s_pos[None] <= qp)
        if window is not None:
            mask &= qp - s_pos[None] < window
        for h in range(n):
            scores = np.where(mask, q[b, :, h] @ k_t[b] / math.sqrt(d), -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[b, :, h] = (probs / probs.sum(axis=-1, keepdims=True)) @ v[b]
    return out


@pytest.mark.parametrize("window", [None, 300])
def test_long_prompt_against_float64(window):
    t_len, n, d = 2048, 2, 16
    q, k_t, v = make_inputs(3, 1, t_len, n, d, t_len)
    q_pos, key_len = np.arange(t_len, dtype=np.int32)[None], np.asarray([t_len], np.int32)
    got = blocked_attend(q, k_t, v, jnp.asarray(q_pos), jnp.asarray(key_len), window=window,
                         q_block=128, k_block=256)
    want = numpy_reference(q, k_t, v, q_pos, key_len, window)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=ATOL)


def walk_shapes(jaxpr):
    """Shapes of every value an equation of ``jaxpr`` (or any nested jaxpr: loop bodies, conds,
    inner jits) produces."""
    for eqn in jaxpr.eqns:
        yield from (tuple(var.aval.shape) for var in eqn.outvars if hasattr(var.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from walk_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from walk_shapes(sub)


def shape_args(t_len, n, d, s_cap):
    return (jax.ShapeDtypeStruct((1, t_len, n, d), jnp.float32),
            jax.ShapeDtypeStruct((1, d, s_cap), jnp.float32),
            jax.ShapeDtypeStruct((1, s_cap, d), jnp.float32),
            jax.ShapeDtypeStruct((1, t_len), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))


def largest_intermediate(fn, t_len, n, d):
    jaxpr = jax.make_jaxpr(fn)(*shape_args(t_len, n, d, t_len)).jaxpr
    return max(math.prod(s) for s in walk_shapes(jaxpr))


def test_no_prompt_square_array():
    t_len, n, d = 4096, 2, 16
    blocked = largest_intermediate(
        lambda *a: blocked_attend(*a, q_block=128, k_block=512), t_len, n, d)
    assert blocked < t_len * t_len
    assert blocked <= max(128 * n * 512, t_len * n * d)  # a score tile or the q/output
    # The walker does see the reference's full score array.
    assert largest_intermediate(plain_attend, t_len, n, d) >= t_len * t_len


@pytest.mark.parametrize("t_len", [4096, 4000])
def test_working_set_estimate_bounds_compiled_memory(t_len):
    n, d, s_cap = 16, 128, 4096  # bench attention shapes; 4000 exercises query padding
    compiled = jax.jit(blocked_attend).lower(*shape_args(t_len, n, d, s_cap)).compile()
    mem = compiled.memory_analysis()
    estimate = blocked_working_set_bytes(1, t_len, n, d, s_cap)
    assert mem.temp_size_in_bytes + mem.output_size_in_bytes <= estimate
    assert estimate < plain_working_set_bytes(1, t_len, n, d, s_cap) / 20


def visits(t_len, s_cap, q_pos, key_len, window, q_block, k_block, batch=1):
    q, k_t, v = make_inputs(4, batch, t_len, 2, 16, s_cap)
    _, counts = blocked_attend_stats(q, k_t, v, jnp.asarray(q_pos, jnp.int32),
                                     jnp.asarray(key_len, jnp.int32), window=window,
                                     q_block=q_block, k_block=k_block)
    return np.asarray(counts)


def test_skipped_blocks_are_not_visited():
    t_len, blk = 1024, 128
    causal = visits(t_len, t_len, arange_rows([0], t_len), [t_len], None, blk, blk)
    np.testing.assert_array_equal(causal[0], np.arange(1, 9))  # 36 of 64 tiles: the triangle
    windowed = visits(t_len, t_len, arange_rows([0], t_len), [t_len], 100, blk, blk)
    np.testing.assert_array_equal(windowed[0], [1] + [2] * 7)  # a band, not the triangle
    # Chunked prefill into a 4096-slot cache: blocks at/past key_len (= 576) are never read.
    chunk = visits(64, 4096, arange_rows([512], 64), [576], None, 64, blk)
    np.testing.assert_array_equal(chunk, [[5]])
    # Ragged decode: each row reads only its own filled blocks.
    lens = np.asarray([1, 128, 129, 4096])
    decode = visits(1, 4096, (lens - 1)[:, None], lens, None, 1, blk, batch=4)
    np.testing.assert_array_equal(decode[:, 0], [1, 1, 2, 32])
