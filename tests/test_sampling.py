"""Sampling properties: filters never leave their set, seeds reproduce, greedy is argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.errors import Step3Error
from step3_jax.runtime import sampling
from step3_jax.runtime.generate import generate

V = 100
_sample = jax.jit(sampling.sample)


def _draw(logits, seed, n, temperature=1.0, top_k=0, top_p=1.0):
    keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.PRNGKey(seed), b))(
        jnp.arange(logits.shape[0]))
    return np.stack([np.asarray(_sample(logits, keys, jnp.int32(i), jnp.float32(temperature),
                                        jnp.int32(top_k), jnp.float32(top_p)))
                     for i in range(n)])


@pytest.fixture(scope="module")
def logits():
    return jnp.asarray(np.random.default_rng(0).normal(size=(4, V)).astype(np.float32) * 2.0)


def test_top_k_never_leaves_the_k_most_likely(logits):
    draws = _draw(logits, seed=1, n=200, top_k=5)
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    for b in range(4):
        assert set(draws[:, b]) <= set(top5[b])
        assert len(set(draws[:, b])) > 1  # it does sample, not collapse to argmax


def test_top_p_never_leaves_the_nucleus(logits):
    p = 0.6
    draws = _draw(logits, seed=2, n=200, top_p=p)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for b in range(4):
        order = np.argsort(-probs[b])
        before = np.cumsum(probs[b][order]) - probs[b][order]
        nucleus = set(order[before < p])
        assert set(draws[:, b]) <= nucleus
        assert len(nucleus) > 1


def test_top_k_and_top_p_compose(logits):
    draws = _draw(logits, seed=3, n=200, top_k=3, top_p=0.999)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for b in range(4):
        assert set(draws[:, b]) <= set(top3[b])


def test_greedy_is_argmax_and_temperature_zero_ignores_filters(logits):
    draws = _draw(logits, seed=4, n=3, temperature=0.0, top_k=7, top_p=0.5)
    assert (draws == np.asarray(logits).argmax(-1)).all()


def test_seeds_reproduce_and_differ(logits):
    a, b = _draw(logits, seed=5, n=50), _draw(logits, seed=5, n=50)
    c = _draw(logits, seed=6, n=50)
    assert (a == b).all() and not (a == c).all()


def test_sampling_frequencies_follow_the_distribution():
    """Temperature 1, no filter: empirical frequencies within 4 standard errors of softmax."""
    logits = jnp.asarray([[0.0, 1.0, 2.0, -jnp.inf]])
    keys = jax.random.PRNGKey(0)[None]
    draws = np.asarray(jax.vmap(lambda i: _sample(logits, keys, i, jnp.float32(1.0), jnp.int32(0),
                                                  jnp.float32(1.0)))(jnp.arange(4000)))[:, 0]
    probs = np.asarray(jax.nn.softmax(logits[0]))
    freq = np.bincount(draws, minlength=4) / len(draws)
    se = np.sqrt(probs * (1 - probs) / len(draws))
    assert np.all(np.abs(freq - probs) <= 4 * se + 1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "--top-p must be in (0, 1]"),
    (dict(top_p=1.5), "--top-p must be in (0, 1]"),
    (dict(temperature=-1.0), "--temperature must be >= 0"),
    (dict(temperature=float("inf")), "--temperature must be >= 0 and finite in float32"),
    (dict(temperature=float("nan")), "--temperature must be >= 0 and finite in float32"),
    (dict(temperature=1e39), "got 1e+39"),  # finite in Python, inf as the device's float32
    (dict(top_k=-2), "--top-k must be an integer >= 0"),
])
def test_bad_sampling_settings_are_named(kwargs, message):
    settings = dict(temperature=1.0, top_k=0, top_p=1.0) | kwargs
    with pytest.raises(Step3Error) as e:
        sampling.check(**settings)
    assert message in str(e.value)


def test_generate_sampling_is_seeded(tiny_params, tiny_cfg):
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9, eos_ids=[])
    a, _ = generate(tiny_params, tiny_cfg, [[1, 2, 3]], seed=7, **kwargs)
    b, _ = generate(tiny_params, tiny_cfg, [[1, 2, 3]], seed=7, **kwargs)
    c, _ = generate(tiny_params, tiny_cfg, [[1, 2, 3]], seed=8, **kwargs)
    assert a[0].generated_ids == b[0].generated_ids != c[0].generated_ids


def test_argmax_is_numpy_argmax_with_ties_and_masked_padding():
    """The two-reduction argmax picks the first maximum, like ``np.argmax``, also with ``-inf``
    (the vocabulary padding), exact ties and NaN."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 257)).astype(np.float32)
    x[1, [7, 200]] = 9.0           # a tie: the first index wins
    x[2, 250:] = -np.inf           # padding columns
    x[3, :] = -np.inf
    x[3, 5] = 0.0
    x[4] = np.round(x[4])          # many ties
    x[5, [9, 30]] = np.nan         # NaN counts as the maximum, first one wins (as jnp.argmax)
    np.testing.assert_array_equal(jax.jit(sampling.argmax)(jnp.asarray(x)), np.argmax(x, -1))


@pytest.mark.parametrize("temperature", [1e-30, 1e-3, 1.0, 1e30, 3.4e38])
def test_no_temperature_draws_a_padded_id(temperature):
    """Issue 17: ``--temperature inf`` drew id 258, the demo's padding. The padding's ``-inf``
    logits stay out at every finite temperature; a tiny one is greedy (every real logit below
    the maximum goes to ``-inf``, the maximum stays 0), a huge one uniform over the real ids."""
    rng = np.random.default_rng(5)
    real, padded = 258, 384
    logits = np.full((3, padded), -np.inf, np.float32)
    logits[:, :real] = rng.normal(size=(3, real)) * 3.0 - 50.0  # every real logit negative
    draws = _draw(jnp.asarray(logits), seed=9, n=40, temperature=temperature)
    assert draws.max() < real
    if temperature <= 1e-3:
        assert (draws == logits.argmax(-1)).all()
    if temperature >= 1e30:
        assert len(set(draws.ravel().tolist())) > 60  # 120 draws spread over the 258 ids
