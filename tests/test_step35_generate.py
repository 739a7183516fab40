"""Generation and scoring for Step-3.5 (``runtime/generate.py`` over ``model/step35.py``) on the
``step35-tiny`` preset (window 8, random weights), against the model's own full forward.

Prompts of 3, 9 (the window + 1) and 14 tokens decode 13 tokens each: every sequence crosses the
window and reuses its sliding layers' 8-slot ring slots (positions up to 26). Compiling is most
of the cost (~2-4 s a program on 2 quiet cores), so the tests share a handful of programs: one
generator for batches of three, one jitted forward of ``[1, 32]`` tokens as the teacher, the
chunked prefill at two chunk sizes, and ``score`` in pieces of 12 (longer than the window;
the whole-text path is one ``forward`` call, the CLI test's default).

Tolerances: everything runs in float32. The decode loop (ring caches, one token a step) and a
full forward over the same tokens sum the same products in different orders: logits agree to
~1e-6 of their scale (~1). Greedy tokens are compared exactly, which that rounding cannot flip
where the top two logits differ by more than 1e-4; the tests assert that margin on the teacher-
forced logits first, so an exact comparison is sound. Prefill logits and cached K/V, chunked vs
whole, are checked at 1e-5 relative + 1e-5 absolute (~100 float32 roundings of ~6e-8);
log-probabilities at 2e-5 absolute (a log-sum-exp over 250 logits of scale ~3 adds ~1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.model import step35
from step3_jax.model.step35_reader import load_any_config
from step3_jax.model.step35_weights import init_params
from step3_jax.runtime.generate import Generator, score

from conftest import run_cli

CFG = load_any_config("step35-tiny")
PROMPTS = [[5, 17, 42], [7, 3, 99, 11, 249, 60, 2, 8, 13],
           [21, 22, 23, 24, 100, 101, 102, 9, 8, 7, 6, 5, 4, 3]]
NEW = 13
PAD = 32  # every teacher-forced row fits; right padding cannot change a causal forward
MARGIN = 1e-4
CLOSE = dict(rtol=1e-5, atol=1e-5)
# The test's own programs (teacher, chunked prefills) compile without LLVM's optimizations:
# half the compile time of these run-once programs, and the same operations in the same order.
QUICK = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def gen(params):
    """One generator for the module: its executables are reused across the tests."""
    return Generator(params, CFG)


@pytest.fixture(scope="module")
def batch(gen):
    return gen(PROMPTS, max_new_tokens=NEW, eos_ids=[-1])


@pytest.fixture(scope="module")
def teacher(params, batch):
    """Each prompt + its greedy continuation, and the full forward's logits over it."""
    results, _ = batch
    forward = jax.jit(step35.forward, static_argnums=(3,), compiler_options=QUICK)
    rows, logits = [], []
    for r in results:
        row = r.prompt_ids + r.generated_ids
        tokens = np.zeros((1, PAD), np.int32)
        tokens[0, : len(row)] = row
        rows.append(row)
        logits.append(np.asarray(forward(params, jnp.asarray(tokens), None, CFG)[0][0]))
    return rows, logits


def test_greedy_generate_is_teacher_forced_argmax_across_the_window(batch, teacher):
    results, metrics = batch
    rows, logits = teacher
    assert CFG.sliding_window == 8 and metrics["cache_capacity"] >= max(map(len, rows))
    for r, row, row_logits in zip(results, rows, logits):
        assert len(r.generated_ids) == NEW and r.finish_reason == "length"
        # the last token fed sits at len(row) - 2 >= 8: a ring slot was written twice
        assert len(row) - 2 >= CFG.sliding_window
        steps = row_logits[len(r.prompt_ids) - 1: len(row) - 1]
        top2 = np.sort(steps, axis=-1)[:, -2:]
        assert np.min(top2[:, 1] - top2[:, 0]) > MARGIN  # see the module docstring
        assert np.argmax(steps, axis=-1).tolist() == r.generated_ids


def test_a_ragged_batch_is_each_prompt_alone(gen, batch):
    """Each prompt decoded in a batch of copies of itself (so the batch-of-three programs
    serve) gives what it gave beside prompts of other lengths."""
    results, _ = batch
    for prompt, together in zip(PROMPTS, results):
        alone, _ = gen([prompt] * len(PROMPTS), max_new_tokens=NEW, eos_ids=[-1])
        assert all(a.generated_ids == together.generated_ids for a in alone)


def test_eos_stops_each_sequence_at_its_first_stop_token(gen, batch):
    results, _ = batch
    stop = results[0].generated_ids[4]
    stopped, _ = gen(PROMPTS, max_new_tokens=NEW, eos_ids=[stop])
    hits = 0
    for full, r in zip(results, stopped):
        if stop in full.generated_ids:
            hits += 1
            cut = full.generated_ids.index(stop) + 1
            assert r.generated_ids == full.generated_ids[:cut] and r.finish_reason == "eos"
        else:
            assert r.generated_ids == full.generated_ids and r.finish_reason == "length"
    assert hits >= 1


@pytest.fixture(scope="module")
def chunked(params, teacher):
    """The first 24 tokens of each teacher row prefilled with lengths 16, 21 and 24 (past two
    windows; one padded), in chunks of 4 (< the window) and of 12 (> the window)."""
    rows, _ = teacher
    tokens = jnp.asarray([(row + [0] * 24)[:24] for row in rows], jnp.int32)
    lengths = jnp.asarray([16, 21, 24], jnp.int32)
    run = jax.jit(step35.prefill, static_argnums=(3, 4, 5), compiler_options=QUICK)
    return lengths, {c: run(params, tokens, lengths, 32, CFG, c) for c in (4, 12)}


@pytest.mark.parametrize("chunk", [4, 12])
def test_chunked_prefill_logits_are_the_full_forward(teacher, chunked, chunk):
    _, logits = teacher
    lengths, out = chunked
    got, cache = out[chunk]
    want = np.stack([logits[b][n - 1] for b, n in enumerate(np.asarray(lengths))])
    scale = float(np.max(np.abs(want[:, : CFG.vocab_size])))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths))
    assert cache.capacity == 32 and cache.batch == 3


def test_chunked_prefill_caches_agree_slot_for_slot(chunked):
    """Chunks of 4 and of 12 leave the same K/V in the same slots, rings included (the whole
    prompt's prefill is checked through generation against the teacher)."""
    _, out = chunked
    (_, small), (_, big) = out[4], out[12]
    for i in range(CFG.num_hidden_layers):
        assert small.k[i].shape[1] == big.k[i].shape[1] == (8 if CFG.is_sliding(i) else 32)
        np.testing.assert_allclose(np.asarray(small.k[i]), np.asarray(big.k[i]), **CLOSE)
        np.testing.assert_allclose(np.asarray(small.v[i]), np.asarray(big.v[i]), **CLOSE)


def test_score_is_log_softmax_of_the_full_forward(params, teacher):
    rows, logits = teacher
    ids = rows[2]  # 27 tokens: past three windows
    want = jax.nn.log_softmax(jnp.asarray(logits[2][: len(ids) - 1]), axis=-1)
    want = np.take_along_axis(np.asarray(want), np.asarray(ids[1:])[:, None], axis=-1)[:, 0]
    got = score(params, CFG, ids, prefill_chunk=12)  # 3 pieces of 12 against the cache
    assert len(got) == len(ids) - 1
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


# ----- the CLI -------------------------------------------------------------------------------------

def test_cli_generate_and_score_run_step35(capsys, batch, teacher):
    """The CLI's random weights for ``--config step35-tiny`` (seed 0) are the module's; the
    batch of three reuses its programs (the persistent compilation cache)."""
    import json

    results, _ = batch
    prompts = [a for p in PROMPTS for a in ("--prompt-ids", ",".join(map(str, p)))]
    code, out, _ = run_cli(capsys, "generate", "--config", "step35-tiny", *prompts,
                           "--max-new-tokens", str(NEW), "--eos-id", "-1", "--json", "-q")
    assert code == 0
    doc = json.loads(out)
    assert [r["generated_ids"] for r in doc["results"]] == [r.generated_ids for r in results]
    assert doc["metrics"]["config"] == "step35-tiny"
    rows, logits = teacher
    code, out, _ = run_cli(capsys, "score", "--config", "step35-tiny", "--ids",
                           ",".join(map(str, rows[2])), "--json", "-q")  # one whole forward
    assert code == 0
    want = jax.nn.log_softmax(jnp.asarray(logits[2][: len(rows[2]) - 1]), axis=-1)
    want = np.take_along_axis(np.asarray(want), np.asarray(rows[2][1:])[:, None], axis=-1)
    np.testing.assert_allclose(json.loads(out)["logprobs"], want[:, 0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--prompt-ids", "1,2", "--max-num-seqs", "2"], "engine serves Step-3 only"),
    (["bench", "--requests", "2"], "engine serves Step-3 only"),
    (["generate", "--prompt-ids", "1,2", "--afd", "1:1", "--coordinator", "localhost:1234"],
     "multi-process --afd"),
    (["bench"], "bench measures Step-3 only"),
    (["serve", "--port", "0"], "engine serves Step-3 only"),
])
def test_cli_refuses_what_runs_step3_only_in_one_line(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv[:1], "--config", "step35-tiny", *argv[1:])
    lines = [line for line in err.splitlines() if line.startswith("step3-jax: error:")]
    assert code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err
    assert "is a Step-3.5 model" in lines[0] and fragment in lines[0]


def test_cli_refuses_a_step35_run_that_cannot_fit_before_loading(capsys, monkeypatch):
    """Flash's 196.8B float32 weights alone are 787 GB: refused against a 20 GB host."""
    from step3_jax.analysis import preflight

    monkeypatch.setattr(preflight, "host_available", lambda: 20 * 10**9)
    code, out, err = run_cli(capsys, "generate", "--config", "step35-flash", "--prompt-ids",
                             "1,2", "-q")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == [
        "step3-jax: error: 1 prompt of up to 2 tokens + 32 new needs 787.8 GB (weights 787.8 GB, "
        "kv cache 0.0 GB; activations not counted); this machine has 20.0 GB available"]
