"""Attention-FFN disaggregation of Step-3.5 (``runtime/afd.py`` over ``step35.attention_block`` /
``step35.ffn_block``) on emulated CPU devices, against colocated generation on ``step35-tiny``
(window 8, random weights, seed 0).

The prompts (3, 9 and 14 tokens; 13 new tokens each, as ``test_step35_generate.py`` decodes them,
so the colocated programs are shared through the suite's compilation cache) cross the window:
every sliding layer's 8-slot ring wraps on the attention devices while the full layers keep the
whole context. The batch of 3 is padded to 4 rows: 2 micro-batches of 2 rows on the attention
device. The routers' selection biases (zeros at init) are drawn at random, so that a bias left
behind on the way to the attention side would change which experts run (and the tokens: the CLI
test's zero-bias weights decode others).

Tolerances: AFD sends the activations in full precision here (``transfer_dtype="float32"``), so
it runs the colocated float32 operations on other devices; only the FFN's ``psum`` over ``ep``
and ``tp`` adds in another order and the per-shard batch changes XLA's blocking:
log-probabilities (scale ~6) agree to ~1e-6 (measured 9.5e-7), checked at 1e-4 absolute.
Greedy tokens are compared exactly, as ``test_step35_generate.py`` does for the decode loop (its
teacher-forced margin test guards the same rows). The FP8 transfer is the family-independent
code Step-3's tests bound (tests/test_afd.py); on these weights (1:2, tp=2) it was measured at
<= 0.25 (mean 0.05) log-prob deviation, a bfloat16 transfer at <= 0.008: not re-run here, for
time.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.model.step35_reader import load_any_config
from step3_jax.model.step35_weights import Moe35, init_params
from step3_jax.runtime import afd, afd_schedule
from step3_jax.runtime.generate import generate, score

from conftest import run_cli

CFG = load_any_config("step35-tiny")
PROMPTS = [[5, 17, 42], [7, 3, 99, 11, 249, 60, 2, 8, 13],
           [21, 22, 23, 24, 100, 101, 102, 9, 8, 7, 6, 5, 4, 3]]
NEW = 13


@pytest.fixture(scope="module")
def params():
    """Seeded random weights with random router biases (std 0.3, on the scale of the sigmoid
    scores in (0, 1) that they offset)."""
    p = init_params(CFG, seed=0)
    rng = np.random.default_rng(1)
    layers = tuple(
        lay.replace(ffn=lay.ffn.replace(router_bias=jnp.asarray(
            0.3 * rng.standard_normal(lay.ffn.router_bias.shape), jnp.float32)))
        if isinstance(lay.ffn, Moe35) else lay for lay in p.layers)
    return p.replace(layers=layers)


@pytest.fixture(scope="module")
def colocated(params):
    results, _ = generate(params, CFG, PROMPTS, max_new_tokens=NEW, eos_ids=[-1])
    return [r.generated_ids for r in results], score(params, CFG, PROMPTS[2])


@pytest.fixture(scope="module")
def model(params):
    """1 attention device; the FFN group ep=2 x tp=2 (each device half the width of 4 of the 8
    experts, and of the shared expert and the dense layer)."""
    return afd.place(params, CFG, afd.parse_plan("1:4", "ep=2,tp=2", 2,
                                                 transfer_dtype="float32"))


def test_step35_afd_equals_colocated(model, colocated):
    results, metrics = afd.generate(model, PROMPTS, max_new_tokens=NEW, eos_ids=[-1])
    assert [r.generated_ids for r in results] == colocated[0]
    assert all(r.finish_reason == "length" for r in results)
    np.testing.assert_allclose(afd.score(model, PROMPTS[2]), colocated[1], rtol=0, atol=1e-4)
    # The profiled step found one launch per layer and micro-batch on every device: the
    # Step-3.5 programs keep the names afd_trace labels.
    assert metrics["afd"]["timeline_source"] == "jax.profiler"
    assert metrics["afd"]["tokens_per_micro_batch"] == 2
    # Per token: 64 float32 activations A->F + top-2 routing (4 B weight + 4 B id) on MoE
    # layers; 64 float32 back.
    assert model.transfer_bytes_per_layer(1) == {"a2f": 64 * 4 + 2 * 8, "f2a": 64 * 4}


def test_step35_placement_and_caches(model, params):
    """The router and its float32 bias live with attention, the experts (stacked) only on the
    FFN group; each shard's cache has Step-3.5's per-layer shapes (sliding rings of 8)."""
    attn, ffn = set(model.attn_devices), set(model.ffn_devices)
    assert not attn & ffn
    assert all(a.sharding.device_set == attn for a in jax.tree.leaves(model.attn))
    assert all(a.sharding.device_set <= ffn for a in jax.tree.leaves(model.ffn))
    for i, (side, f) in enumerate(zip(model.attn.layers, model.ffn)):
        if i in CFG.moe_layers:
            assert isinstance(f, Moe35) and f.router is None and f.router_bias is None
            assert f.gate.shape == params.layers[i].ffn.gate.shape  # stacked [E, Fe, H]
            assert side.ffn.router_bias.dtype == np.float32
            np.testing.assert_array_equal(side.ffn.router_bias, params.layers[i].ffn.router_bias)
        else:
            assert side.ffn is None and not isinstance(f, Moe35)
    shard = afd_schedule.Shard(0, model.attn_devices[0], slice(0, 3))
    afd_schedule.new_cache(CFG, shard, 32)
    want = [(3, 8 if CFG.is_sliding(i) else 32, 2, 16) for i in range(CFG.num_hidden_layers)]
    assert [k.shape for k in shard.k] == [v.shape for v in shard.v] == want
    assert {d for k in shard.k for d in k.sharding.device_set} == {model.attn_devices[0]}


def test_cli_generate_afd_runs_step35(capsys, colocated):
    """``generate --afd`` loads the weights straight onto the two groups (``afd_shardings``,
    the bias included) and decodes the colocated tokens of the CLI's weights (seed 0, zero
    biases: other tokens than the biased module's, so the bias does choose here); across
    processes it is refused."""
    results, _ = generate(init_params(CFG, seed=0), CFG, PROMPTS, max_new_tokens=NEW,
                          eos_ids=[-1])  # the colocated programs again (compiled above)
    want = [r.generated_ids for r in results]
    assert want != colocated[0]
    prompts = [a for p in PROMPTS for a in ("--prompt-ids", ",".join(map(str, p)))]
    code, out, _ = run_cli(capsys, "generate", "--config", "step35-tiny", *prompts,
                           "--max-new-tokens", str(NEW), "--eos-id", "-1", "--afd", "1:4",
                           "--ffn-mesh", "ep=2,tp=2", "--micro-batches", "2",
                           "--afd-transfer-dtype", "float32", "--json", "-q")
    assert code == 0
    doc = json.loads(out)
    assert [r["generated_ids"] for r in doc["results"]] == want
    assert doc["placement"] == {"attention_devices": [0], "ffn_devices": [1, 2, 3, 4]}
    code, out, err = run_cli(capsys, "generate", "--config", "step35-tiny", "--prompt-ids", "1,2",
                             "--afd", "1:1", "--coordinator", "localhost:1234")
    lines = [line for line in err.splitlines() if line.startswith("step3-jax: error:")]
    assert code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err
    assert "is a Step-3.5 model: multi-process --afd" in lines[0]
