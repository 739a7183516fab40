"""The continuous-batching engine (issue 15): engine = static batch, paged = contiguous.

Greedy tokens through the engine must equal the static ``generate`` tokens exactly (float32, the
tiny model: the same computation on differently shaped programs; a flip would need two logits
within ~1e-6 of each other), with more requests than slots, with too few pages (preemption),
with chunked prefill, on a mesh and under AFD. Sampling is seeded per request and token index,
so a request's sampled tokens must not depend on its batch-mates or on preemption.
"""

import json

import numpy as np
import pytest

from step3_jax.errors import Step3Error
from step3_jax.model import decoder, paged
from step3_jax.runtime.engine_setup import generate_requests, make_engine, request_mix
from step3_jax.runtime.generate import generate

from conftest import run_cli

# A dozen mixed prompts (2-70 tokens) with mixed budgets (3-30 tokens).
LENGTHS = [5, 30, 12, 70, 3, 44, 9, 21, 2, 17, 60, 8]
BUDGETS = [7, 20, 3, 12, 30, 5, 9, 16, 25, 11, 8, 4]


@pytest.fixture(scope="module")
def mix(tiny_cfg):
    rng = np.random.default_rng(7)
    return [rng.integers(0, tiny_cfg.vocab_size, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def static_full(tiny_params, tiny_cfg, mix):
    """The static batch's greedy tokens, 30 per request."""
    results, _ = generate(tiny_params, tiny_cfg, mix, max_new_tokens=max(BUDGETS), eos_ids=[-1])
    return [r.generated_ids for r in results]


@pytest.fixture(scope="module")
def static(static_full):
    """Each cut to its request's budget (greedy decoding's first n tokens do not depend on how
    many more follow)."""
    return [ids[:n] for ids, n in zip(static_full, BUDGETS)]


def run_engine(engine, prompts, budgets, **knobs):
    ids = [engine.add_request(p, max_tokens=n, stop_ids=[-1], **knobs)
           for p, n in zip(prompts, budgets)]
    engine.run(max_steps=500)
    assert not engine.has_unfinished()
    return [engine.result(i).generated_ids for i in ids]


def assert_idle(engine):
    """Nothing leaks: no slot held, every page back in the free list."""
    assert all(s is None for s in engine.slots) and not engine.waiting
    assert [p.free for p in engine.pools] == [p.size for p in engine.pools]
    assert engine.metrics()["pages_used"] == 0


# Every engine here has pages of 8 tokens, 2 or 4 slots and bursts of 8 or 3 steps, so the
# tests share a handful of compiled programs (engine_steps' jits are module-level).
@pytest.mark.parametrize("kw, preempted", [
    (dict(max_num_seqs=2, prefill_chunk=0), False),   # 12 requests, 2 slots, whole prompts
    (dict(max_num_seqs=4, num_pages=14, prefill_chunk=16, decode_steps=3), True),  # short pool
], ids=["more-requests-than-slots-whole-prompts", "preemption-chunked"])
def test_engine_greedy_equals_the_static_batch(tiny_params, tiny_cfg, mix, static, kw, preempted):
    engine = make_engine(tiny_params, tiny_cfg, **{"page_size": 8, **kw})
    assert run_engine(engine, mix, BUDGETS) == static
    metrics = engine.metrics()
    assert (metrics["preemptions"] > 0) == preempted
    assert metrics["finished"] == len(mix) and metrics["generated_tokens"] == sum(BUDGETS)
    assert metrics["peak_pages_used"] <= metrics["pages_total"]
    assert_idle(engine)


def test_chunked_prefill_respects_the_token_budget(tiny_params, tiny_cfg, mix, static):
    """No step prefills more than --prefill-chunk tokens, so decoding sequences wait at most one
    chunk; a 70-token prompt at chunk 16 enters over 5 steps while the others decode."""
    engine = make_engine(tiny_params, tiny_cfg, max_num_seqs=4, page_size=8, prefill_chunk=16,
                         decode_steps=3)
    calls = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda *a: calls.append((engine.stats["steps"], int(a[4][0]))) or \
        prefill(*a)
    assert run_engine(engine, mix, BUDGETS) == static
    per_step = {}
    for step, n in calls:
        per_step[step] = per_step.get(step, 0) + n
    assert max(per_step.values()) <= 16 and sum(per_step.values()) == sum(LENGTHS)
    assert len(per_step) >= -(-sum(LENGTHS) // 16)
    assert engine.metrics()["preemptions"] == 0
    timings = engine.requests["0"].timings()
    assert timings["ttft_s"] > 0 and timings["tpot_s"] > 0 and timings["itl_s"]


def test_sampling_depends_only_on_the_request(tiny_params, tiny_cfg, mix):
    """The same seeded request alone, among others, and through preemption: the same tokens."""
    knobs = dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    alone = make_engine(tiny_params, tiny_cfg, max_num_seqs=4, page_size=8)
    solo = run_engine(alone, [mix[1]], [20], **knobs)[0]
    crowd = make_engine(tiny_params, tiny_cfg, max_num_seqs=4, page_size=8, num_pages=14,
                        prefill_chunk=16)
    others = [crowd.add_request(p, max_tokens=n, stop_ids=[-1], temperature=1.0, seed=s)
              for s, (p, n) in enumerate(zip(mix[2:6], BUDGETS[2:6]))]
    target = crowd.add_request(mix[1], max_tokens=20, stop_ids=[-1], **knobs)
    crowd.run(max_steps=500)
    assert crowd.result(target).generated_ids == solo
    assert crowd.metrics()["preemptions"] > 0 and len(others) == 4
    greedy = run_engine(alone, [mix[1]], [20])[0]
    assert solo != greedy  # it did sample


def test_cancel_frees_slots_and_pages(tiny_params, tiny_cfg, mix):
    engine = make_engine(tiny_params, tiny_cfg, max_num_seqs=2, page_size=8)
    ids = [engine.add_request(p, max_tokens=30, stop_ids=[-1]) for p in mix[:4]]
    engine.step()
    assert engine.metrics()["running"] == 2 and engine.metrics()["pages_used"] > 0
    assert engine.cancel(ids[0]) and engine.cancel(ids[3])  # one running, one waiting
    assert not engine.cancel(ids[0]) and not engine.cancel("nope")
    assert engine.result(ids[0]).finish_reason == "cancelled"
    engine.run(max_steps=500)
    assert [engine.result(i).finish_reason for i in ids] == ["cancelled", "length", "length",
                                                            "cancelled"]
    assert engine.result(ids[3]).generated_ids == []
    assert_idle(engine)
    assert engine.forget(ids[1]).request_id == ids[1] and ids[1] not in engine.requests


def test_first_tokens_can_be_delivered_before_the_burst(tiny_params, tiny_cfg, mix, static):
    """``step(early=...)`` hands the prefill's first tokens over before the decode burst; the
    tokens are the same and none is delivered twice."""
    engine = make_engine(tiny_params, tiny_cfg, max_num_seqs=2, page_size=8)
    ids = [engine.add_request(p, max_tokens=n, stop_ids=[-1]) for p, n in
           zip(mix[:3], BUDGETS[:3])]
    got = {i: [] for i in ids}
    early_calls = []

    def early(outputs):  # a prefill's output: one first token, before the burst's tokens
        for out in outputs:
            assert len(out.new_token_ids) == 1 and got[out.request_id] == []
            got[out.request_id] += out.new_token_ids
        early_calls.extend(outputs)

    for _ in range(100):
        if not engine.has_unfinished():
            break
        for out in engine.step(early=early):
            got[out.request_id] += out.new_token_ids
    assert len(early_calls) == 3
    assert [got[i] for i in ids] == static[:3]


def test_stop_ids_end_a_request(tiny_params, tiny_cfg, mix, static):
    engine = make_engine(tiny_params, tiny_cfg, max_num_seqs=4, page_size=8)
    stop = static[1][4]
    out = run_engine(engine, mix[:1], [1])  # warm nothing; a one-token request finishes at once
    assert out == [static[0][:1]]
    rid = engine.add_request(mix[1], max_tokens=20, stop_ids=[stop])
    engine.run(max_steps=100)
    r = engine.result(rid)
    assert r.generated_ids == static[1][: static[1].index(stop) + 1] and r.finish_reason == "eos"


@pytest.mark.parametrize("bad, message", [
    (dict(prompt=[]), "request .*: the prompt is empty"),
    (dict(prompt=[1, 999]), "token id 999 is outside the vocabulary"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(max_tokens=500), r"prompt \(3 tokens\) \+ max_tokens \(500\) - 1 = 502 positions, "
                           r"more than the context \(256\)"),
    (dict(max_tokens=100), r"needs 13 pages of 8 tokens, more than the whole pool "
                           r"\(--num-pages 12\)"),
    (dict(temperature=-1.0), "--temperature must be >= 0"),
    (dict(stop_ids=[300]), "--eos-id 300 is outside the vocabulary"),
])
def test_requests_that_can_never_run_are_refused_when_added(tiny_params, tiny_cfg, bad, message):
    engine = make_engine(tiny_params, tiny_cfg.replace(max_position_embedding=256),
                         max_num_seqs=2, page_size=8, num_pages=12)
    request = dict(prompt=[1, 2, 3], max_tokens=4) | bad
    with pytest.raises(Step3Error, match=message):
        engine.add_request(request.pop("prompt"), **request)
    assert not engine.has_unfinished()


def test_engine_arguments_are_checked(tiny_params, tiny_cfg):
    for kw, flag in [(dict(max_num_seqs=0), "--max-num-seqs"), (dict(page_size=0), "--page-size"),
                     (dict(num_pages=0), "--num-pages"), (dict(decode_steps=0), "--decode-steps"),
                     (dict(prefill_chunk=-1), "--prefill-chunk")]:
        with pytest.raises(Step3Error, match=f"{flag} must be >= "):
            make_engine(tiny_params, tiny_cfg, **kw)
    with pytest.raises(Step3Error, match="needs .* GB of KV cache; .* GB is free"):
        make_engine(tiny_params, tiny_cfg.replace(max_position_embedding=2**20), page_size=2**16,
                    num_pages=2**20)


@pytest.mark.parametrize("impl", ["gather", "blocked"])
def test_paged_attention_equals_the_contiguous_cache(tiny_params, tiny_cfg, impl):
    """Chunks appended through scattered pages give the full causal forward's logits."""
    import jax
    import jax.numpy as jnp

    from test_model import full_logits

    rng = np.random.default_rng(0)
    batch, total, page = 2, 21, 4
    tokens = rng.integers(0, tiny_cfg.vocab_size, (batch, total))
    full = np.stack([full_logits(tiny_params, tiny_cfg, row.tolist()) for row in tokens])
    cfg = tiny_cfg.replace(attention_impl="plain" if impl == "gather" else "blocked")
    pages = paged.init_pages(cfg, 32, page)
    table = jnp.asarray(rng.permutation(32)[: batch * 8].reshape(batch, 8), jnp.int32)

    @jax.jit
    def chunk(pages, tokens, lengths):
        x, pages = decoder.extend_paged(tiny_params, tokens, pages, table, lengths,
                                        jnp.full((batch,), tokens.shape[1], jnp.int32), cfg)
        return pages, decoder.logits_from_hidden(tiny_params, x, cfg)

    lengths, outs = jnp.zeros(batch, jnp.int32), []
    for a, b in [(0, 7), (7, 14), (14, 21)]:  # one compiled chunk shape
        pages, logits = chunk(pages, jnp.asarray(tokens[:, a:b]), lengths)
        outs.append(logits)
        lengths = lengths + (b - a)
    got = np.asarray(jnp.concatenate(outs, 1))[..., : tiny_cfg.vocab_size]
    np.testing.assert_allclose(got, np.asarray(full)[..., : tiny_cfg.vocab_size], atol=2e-5)


def test_engine_on_a_mesh_and_under_afd(hub_dir, tiny_params, tiny_cfg, mix, static):
    from step3_jax.checkpoint.loader import load
    from step3_jax.model.sharding import parse_mesh
    from step3_jax.runtime import afd

    params, cfg = load(hub_dir, progress=False, mesh=parse_mesh("dp=2,tp=2,ep=2"))
    engine = make_engine(params, cfg, max_num_seqs=4, page_size=8, num_pages=20,
                         prefill_chunk=16)
    assert run_engine(engine, mix[:6], BUDGETS[:6]) == static[:6]
    assert engine.runner.placement["mesh"] == {"dp": 2, "tp": 2, "ep": 2}
    m = afd.place(tiny_params, tiny_cfg, afd.parse_plan("2:2", None, 2, "float32"))
    engine = make_engine(None, tiny_cfg, afd=m, max_num_seqs=4, page_size=8, num_pages=12,
                         prefill_chunk=16, decode_steps=3)
    assert run_engine(engine, mix[:6], BUDGETS[:6]) == static[:6]
    assert engine.metrics()["preemptions"] > 0 and engine.metrics()["pages_total"] == 24
    assert_idle(engine)


def test_generate_requests_and_the_request_mix(tiny_params, tiny_cfg, mix, static):
    engine = make_engine(tiny_params, tiny_cfg, max_num_seqs=4, page_size=8)
    results, metrics = generate_requests(engine, mix, max_new_tokens=BUDGETS, eos_ids=[-1])
    assert [r.generated_ids for r in results] == static
    assert metrics["requests"] == 12 and metrics["output_tokens_per_s"] > 0
    assert metrics["kv_bytes_peak"] == metrics["peak_pages_used"] * engine.page_bytes
    with pytest.raises(Step3Error, match="token id 999"):
        generate_requests(engine, [[1], [999]], max_new_tokens=2)
    assert not engine.has_unfinished()  # the valid one was withdrawn with it
    prompts, budgets = request_mix(5, (3, 9), (2, 4), tiny_cfg.vocab_size, seed=1)
    assert len(prompts) == 5 and all(3 <= len(p) <= 9 for p in prompts)
    assert all(2 <= b <= 4 for b in budgets)


def test_cli_generate_through_the_engine(capsys, hub_dir, mix, static_full):
    """Done-when: a dozen mixed prompts with --max-num-seqs 2 and a pool too small for them all
    at once give the static batch's greedy tokens, in prompt order."""
    prompts = sum((["--prompt-ids", ",".join(map(str, p))] for p in mix), [])
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(hub_dir), *prompts,
                             "--max-new-tokens", "12", "--eos-id", "-1", "--json",
                             "--max-num-seqs", "2", "--num-pages", "12", "--page-size", "8",
                             "--prefill-chunk", "16")
    assert code == 0, err
    doc = json.loads(out)
    assert [r["generated_ids"] for r in doc["results"]] == [ids[:12] for ids in static_full]
    assert doc["metrics"]["engine"] and doc["metrics"]["max_num_seqs"] == 2
    assert doc["metrics"]["preemptions"] > 0 and doc["metrics"]["pages_total"] == 12
    code, _, err = run_cli(capsys, "generate", "--config", "tiny", "--prompt-ids", "1",
                           "--max-num-seqs", "0")
    assert code == 2 and err.strip().endswith("--max-num-seqs must be >= 1, got 0")
