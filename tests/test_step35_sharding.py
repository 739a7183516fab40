"""Step-3.5 sharded on a ``(dp, tp, ep)`` mesh of emulated CPU devices (conftest asks for 8)
equals the single-device model: ``step35.forward`` under ``jax.jit`` with the weights placed by
``sharding.param_shardings`` and the KV cache by ``sharding.cache_shardings``, without a cache
on (dp, tp, ep) = (1, 2, 2) and with one on (2, 2, 1) (a prefill, then decode steps crossing
the sliding window); and the mesh checks that reject a split before any work.

The model: ``step35-tiny``'s first two layers (compile time grows with the layers; these two
have every kind of weight and layer): layer 0 full attention (4 query heads) with the dense
FFN, layer 1 sliding (window 8, 6 query heads) with the MoE (8 experts, top-2, a shared
expert); 2 K/V heads of 16 on both.

Tolerance: the programs are the same float32 arithmetic; splitting heads, widths and experts
over devices only changes the order of the partial sums (``o_proj`` over heads, the FFN
down-projections over widths, the expert combine over ``ep``), each a float32 rounding of
~6e-8 relative per term. Through five layers the logits (largest ~4) moved by ~2e-6 when
this was written; we allow 1e-5 of the largest logit, while a wrong split (a query head
reading another device's K/V head, a dropped expert shard) changes logits by O(1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from step3_jax.errors import Step3Error
from step3_jax.model import step35
from step3_jax.model.sharding import (cache_shardings, check_mesh, logical_to_spec, make_mesh,
                                      named, param_shardings)
from step3_jax.model.step35_reader import load_any_config
from step3_jax.model.step35_weights import init_params

TINY = load_any_config("step35-tiny")
_PER_LAYER = ("layer_types", "attention_heads", "rope_theta", "partial_rotary_factor", "use_rope",
              "rope_scaling", "swiglu_limits", "swiglu_limits_shared")
CFG = TINY.replace(num_hidden_layers=2, moe_layers=(1,),
                   **{key: getattr(TINY, key)[:2] for key in _PER_LAYER})
B, PREFILL, STEPS, CAPACITY = 2, 7, 4, 16  # decode positions 7..10 cross the window of 8


@jax.jit
def _full(params, tokens):
    """The forward without a cache: logits ``[B, T, V]``."""
    return step35.forward(params, tokens, None, CFG)[0]


@jax.jit
def _cached(params, tokens, cache):
    """Through the cache, a prefill of ``PREFILL`` tokens then one-token decode steps: the
    logits at every position ``[B, T, V]``, and the cache."""
    prefill, cache = step35.forward(params, tokens[:, :PREFILL], cache, CFG)

    def step(cache, token):  # one decode step (a scan: one copy of the layers to compile)
        logits, cache = step35.forward(params, token[:, None], cache, CFG)
        return cache, logits[:, 0]

    cache, decoded = jax.lax.scan(step, cache, tokens[:, PREFILL:].T)
    return jnp.concatenate([prefill, decoded.transpose(1, 0, 2)], axis=1), cache


@pytest.fixture(scope="module")
def single():
    params = init_params(CFG, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size,
                                                           (B, PREFILL + STEPS)), jnp.int32)
    cached, _ = _cached(params, tokens, step35.init_cache(CFG, B, CAPACITY))
    return params, tokens, np.asarray(_full(params, tokens)), np.asarray(cached)


def _close(got, want):
    v = CFG.vocab_size  # the padding columns are -inf in both
    assert np.all(np.isneginf(np.asarray(got)[..., v:]))
    np.testing.assert_allclose(np.asarray(got)[..., :v], want[..., :v],
                               rtol=0, atol=1e-5 * np.abs(want[..., :v]).max())


def _placed(params, mesh):
    placed = jax.device_put(params, param_shardings(CFG, mesh))
    attn, moe = placed.layers[1].attn, placed.layers[1].ffn
    ep = "ep" if mesh.shape["ep"] > 1 else None
    assert attn.k_proj.sharding.spec == P("tp", None, None)           # [G, d, H] by K/V heads
    assert attn.q_proj.sharding.spec == P("tp", None, None)           # [n, d, H] by heads
    assert moe.gate.sharding.spec == P(ep, "tp", None)                # [E, Fe, H]
    assert moe.router.sharding.spec == P(ep, None)                    # [E, H]
    return placed


# One mesh per path (each sharded program compiles for seconds): the forward without a cache
# splits experts (ep), heads and widths (tp); the cached one batch (dp), heads and the cache's
# K/V heads (tp). The MoE is the same code on both paths.

def test_sharded_forward_without_cache_equals_single_device(single):
    params, tokens, full, _ = single
    mesh = make_mesh(dp=1, tp=2, ep=2)
    got = _full(_placed(params, mesh), tokens)
    assert len(got.sharding.device_set) == 4
    _close(got, full)


def test_sharded_prefill_and_decode_equal_single_device(single):
    params, tokens, _, cached = single
    mesh = make_mesh(dp=2, tp=2, ep=1)
    cache = jax.device_put(step35.init_cache(CFG, B, CAPACITY), cache_shardings(CFG, mesh, CAPACITY))
    assert cache.k[1].sharding.spec == P("dp", None, "tp", None)      # [B, S, G, d]
    got, new_cache = _cached(_placed(params, mesh), jax.device_put(tokens, named(mesh, ("batch",))),
                             cache)
    assert len(got.sharding.device_set) == 4
    _close(got, cached)
    np.testing.assert_array_equal(new_cache.lengths, [PREFILL + STEPS] * B)


def test_query_and_kv_head_blocks_line_up():
    """With tp | G, the contiguous tp blocks of query heads read K/V heads of their own block
    only (the arithmetic of ``sharding``'s module docstring), on every Flash-like shape."""
    for n, G in [(4, 2), (6, 2), (64, 8), (96, 8)]:
        for tp in (t for t in range(1, G + 1) if G % t == 0):
            for h in range(n):
                assert h // (n // tp) == (h // (n // G)) // (G // tp), (n, G, tp, h)


def test_mesh_that_does_not_divide_is_one_line():
    flash = load_any_config("step35-flash")
    abstract = jax.sharding.AbstractMesh((1, 3, 1), ("dp", "tp", "ep"))
    with pytest.raises(Step3Error, match=r"^mesh tp=3 does not divide the 8 K/V heads"):
        check_mesh(flash, abstract)
    with pytest.raises(Step3Error, match=r"^mesh ep=5 does not divide the 288 routed experts"):
        param_shardings(flash, jax.sharding.AbstractMesh((1, 1, 5), ("dp", "tp", "ep")))
    # tp=4 divides Flash's 8 K/V heads, 64 and 96 query heads: accepted.
    check_mesh(flash, jax.sharding.AbstractMesh((1, 4, 1), ("dp", "tp", "ep")))
    with pytest.raises(Step3Error, match=r"mesh tp=4 does not divide the 2 K/V heads"):
        cache_shardings(TINY, make_mesh(tp=4), 16)
    assert logical_to_spec(("batch", "cache_len", "kv_heads", "head_dim"),
                           make_mesh(2, 2, 2)) == P("dp", None, "tp", None)
    # Step-3's cache (one K/V head) stays split by batch only.
    step3 = cache_shardings(load_any_config("tiny"), make_mesh(2, 2, 2), 16)
    assert step3.k[0].spec == P("dp", None, None) and step3.lengths.spec == P("dp")
