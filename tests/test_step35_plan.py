"""``step3-jax plan`` for Step-3.5-Flash: the memory plan's Step-3.5 figures checked by hand.

Step-3.5-Flash (``configs/step35-flash.json``, spec ``shared/spec/step35.md`` section 1): H 4096,
45 layers (full attention at i % 4 == 0: 12 full, 33 sliding with a window of 512), 64 query
heads on full layers and 96 on sliding ones, 8 K/V heads of 128 everywhere; dense FFN 11264 on
layers 0-2, then 42 MoE layers of 288 experts (width 1280, top-8) + a shared expert of 1280;
vocabulary 128896. Integer arithmetic throughout: the expectations are exact.
"""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from step3_jax.analysis import deployment, plan
from step3_jax.analysis import sizing as sizing_mod
from step3_jax.errors import Step3Error
from step3_jax.model import step35
from step3_jax.model.sharding import cache_shardings, make_mesh, named, param_shardings
from step3_jax.model.step35_reader import load_any_config
from step3_jax.model.step35_weights import abstract_params, specs

from conftest import run_cli

H, d, G, V = 4096, 128, 8, 128_896
FULL, SLIDING, WINDOW, MOE, E, FE = 12, 33, 512, 42, 288, 1280
PER_POSITION = 2 * G * d                                 # K and V values per position and layer


@pytest.fixture(scope="module")
def flash():
    return load_any_config("step35-flash")


def _kv_per_sequence(context):
    """K/V values one sequence holds: full layers every position, sliding ones the window."""
    return (FULL * context + SLIDING * min(context, WINDOW)) * PER_POSITION


@pytest.mark.parametrize("afd,context,seqs", [("2A1F", 4096, 3 * 2048 // 16),
                                              ("12A1F", 32768, 3 * 22)])
def test_flash_afd_plan_by_hand(flash, afd, context, seqs):
    """Batch 6144 (the paper's 3 x 2048) on 8 FFN devices (ep=8, 36 experts each): 16
    attention devices at 4K; at 32K, 96 (2048 / 96 = 21.3: 22 sequences per micro-batch)."""
    doc = plan.plan(flash, deployment.parse_placement(afd), batch=6144, context=context,
                    weights_format="fp8", kv_dtype="fp8")
    a, f = doc["breakdown"]["attention"], doc["breakdown"]["ffn"]
    assert doc["fits"] and doc["family"] == "Step-3.5"
    assert a["sequences_per_device"] == seqs
    # The KV cache: 24,576 B per token (the 12 full layers, FP8) plus the 33 sliding layers'
    # rings of 512 positions, 34.6 MB per sequence whatever the context.
    assert a["kv_cache"] == seqs * _kv_per_sequence(context)
    assert a["kv_cache"] == seqs * (context * 24_576 + 34_603_008)
    assert f["kv_cache"] == 0
    # Attention devices hold every attention projection whole: q, o [n*d, H], k, v [G*d, H],
    # the head gate [n, H]; FP8, 1 byte each.
    full, sliding = (2 * n * d * H + 2 * G * d * H + n * H for n in (64, 96))
    assert a["weights"]["attention_projections"] == FULL * full + SLIDING * sliding
    # Router [E, H] in BF16 and its float32 bias [E], on the attention side.
    assert a["weights"]["router"] == MOE * (2 * E * H + 4 * E)
    assert a["weights"]["embedding"] == a["weights"]["lm_head"] == 2 * V * H
    # FFN devices: 288 / 8 experts of 3 x 4096 x 1280 each, FP8; at least the routed expert
    # weights over the devices.
    assert f["weights"]["routed_experts"] == MOE * (E // 8) * 3 * H * FE
    assert f["total"] >= MOE * E * 3 * H * FE / 8
    assert f["weights"]["shared_expert"] == MOE * 3 * H * FE      # whole: tp=1
    assert f["weights"]["dense_ffn"] == 3 * 3 * H * 11264
    assert doc["attention_device_bytes"] == a["total"] <= 80e9


def test_window_caps_the_sliding_layers(flash):
    """One sequence, one device, BF16 KV: from 512 to 4096 tokens only the 12 full layers grow."""
    kw = dict(batch=1, weights_format="bf16", kv_dtype="bf16")
    at = {c: plan.plan(flash, deployment.Placement(), context=c, **kw)["breakdown"]["colocated"]
          ["kv_cache"] for c in (100, 512, 4096)}
    assert at[100] == 45 * 100 * PER_POSITION * 2
    assert at[4096] - at[512] == FULL * (4096 - 512) * PER_POSITION * 2


def test_bf16_weights_are_the_declaration(flash):
    """One device, BF16: 2 bytes per declared value (padded vocabulary: 128896 needs none),
    4 per router-bias value (float32 in the checkpoint)."""
    doc = plan.plan(flash, deployment.Placement(), batch=1, context=1, weights_format="bf16",
                    kv_dtype="bf16")
    values = sum(math.prod(s.shape) for s in specs(flash))
    assert doc["breakdown"]["colocated"]["weights"]["total"] == 2 * values + 2 * MOE * E


def test_max_batch_is_the_boundary(flash):
    placement = deployment.parse_placement("2A1F")
    kw = dict(context=4096, weights_format="fp8", kv_dtype="fp8")
    best = plan.max_batch(flash, placement, device_memory=80 * 10**9, **kw)
    assert plan.plan(flash, placement, batch=best, **kw)["fits"]
    assert not plan.plan(flash, placement, batch=best + 1, **kw)["fits"]


def test_cli_json_is_one_document(capsys):
    code, out, err = run_cli(capsys, "plan", "--config", "step35-flash", "--afd", "2A1F",
                             "--batch", "6144", "--context", "4096", "--weights", "fp8",
                             "--kv-dtype", "fp8", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"] == "step35-flash" and doc["fits"] and doc["max_batch"] >= 6144
    assert doc["compiled"] == {"skipped": "the compiled check lowers Step-3's decode programs, "
                                          "not Step-3.5's"}
    assert any(n.startswith("Step-3.5 KV cache") for n in doc["notes"])
    assert any("router" in n and "float32" in n for n in doc["notes"])


@pytest.mark.parametrize("argv,message", [
    (("--mesh", "tp=3"), "mesh tp=3 does not divide the 8 K/V heads"),
    (("--afd", "8:5"), "mesh ep=5 does not divide the 288 routed experts"),
    (("--mesh", "tp=2", "--compiled-check", "on"), "--compiled-check on: the compiled check"),
])
def test_cli_bad_input_is_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, "plan", "--config", "step35-flash", "--batch", "8",
                             "--context", "4096", "--weights", "fp8", "--kv-dtype", "fp8", *argv)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_mesh_check_before_any_work(flash):
    with pytest.raises(Step3Error, match="^mesh tp=16 does not divide the 8 K/V heads"):
        plan.plan(flash, deployment.parse_placement(mesh="tp=16"), batch=1, context=1)


# ----- --afd auto: the group sizes chosen for a workload ------------------------------------------

KW = dict(batch=6144, weights_format="fp8", kv_dtype="fp8", device_memory=80 * 10**9)


def _fits(cfg, a, f, context):
    return plan.plan(cfg, deployment.parse_placement(f"{a}A{f}F"), context=context, **KW)["fits"]


@pytest.mark.parametrize("context,servers", [(4096, 2), (32768, 10)])
def test_auto_picks_the_fewest_servers_that_hold_the_batch(flash, context, servers):
    """One FFN server (ep=8: 36 experts a device, ~25 GB) holds the FFN; the attention group
    is the smallest that fits, the one below it does not."""
    placement, sizing = sizing_mod.choose(flash, context=context, **KW)
    assert (sizing["attention_servers"], sizing["ffn_servers"]) == (servers, 1)
    assert placement == deployment.parse_placement(f"{servers}A1F")
    assert _fits(flash, servers, 1, context) and not _fits(flash, servers - 1, 1, context)


def test_auto_gives_the_papers_attention_groups_for_step3():
    """Step-3 at batch 6144, FP8 (paper.md section 2: 2A at 4K, 4A at 8K): memory alone
    reproduces the attention side (the paper's 2F is for compute and network, not memory)."""
    step3 = load_any_config("step3")
    for context, servers in ((4096, 2), (8192, 4)):
        assert sizing_mod.choose(step3, context=context, **KW)[1]["attention_servers"] == servers


def test_cli_auto(capsys):
    code, out, err = run_cli(capsys, "plan", "--config", "step35-flash", "--afd", "auto",
                             "--batch", "6144", "--context", "4096", "--weights", "fp8",
                             "--kv-dtype", "fp8", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["sizing"]["attention_servers"] == 2 and doc["fits"]
    assert doc["placement"]["attention_devices"] == 16 and doc["notes"][0].startswith("--afd auto")
    code, _, err = run_cli(capsys, "plan", "--config", "step35-flash", "--afd", "auto",
                           "--batch", "200000", "--context", "32768", "--weights", "fp8",
                           "--kv-dtype", "fp8")
    assert code != 0 and err.count("\n") == 1 and "do not fit 256 attention servers" in err


def test_colocated_tp_splits_the_kv_heads(flash):
    """dp=2, tp=8, ep=8 (128 devices): a device holds 64 / 2 sequences' cache at 1 of the 8 K/V
    heads (tp splits them, unlike Step-3's single head), 36 of the 288 experts at 1/8 width."""
    doc = plan.plan(flash, deployment.parse_placement(mesh="dp=2,tp=8,ep=8"), batch=64,
                    context=4096, weights_format="bf16", kv_dtype="bf16")
    c = doc["breakdown"]["colocated"]
    assert c["sequences_per_device"] == 32
    assert c["kv_cache"] == 32 * _kv_per_sequence(4096) * 2 // 8
    assert c["weights"]["routed_experts"] == 2 * MOE * (E // 8) * 3 * H * (FE // 8)


def test_weights_and_cache_equal_the_compiled_decode_step():
    """The plan's per-device weights and KV cache against XLA's arguments of the real decode
    step (``step35.forward``, one token, the cache donated) lowered with abstract inputs placed
    by ``param_shardings``/``cache_shardings`` on dp=2, tp=2, ep=2: equal to the byte, but for
    the step's other inputs, each device's ``lengths`` and tokens (4 rows x 4 bytes each).
    (Temporaries are not compared: the plan counts the ragged MoE kernel, the CPU program runs
    step35_layers' every-expert reference kernel.)"""
    tiny, batch, context = load_any_config("step35-tiny"), 8, 64
    mesh = make_mesh(dp=2, tp=2, ep=2)

    def placed(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            tree, shardings)

    params = placed(abstract_params(tiny), param_shardings(tiny, mesh))
    cache = placed(jax.eval_shape(lambda: step35.init_cache(tiny, batch, context)),
                   cache_shardings(tiny, mesh, context))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=named(mesh, ("batch", "seq")))
    step = jax.jit(lambda p, t, c: step35.forward(p, t, c, tiny), donate_argnums=2)
    compiled = step.lower(params, tokens, cache).compile().memory_analysis()
    doc = plan.plan(tiny, deployment.parse_placement(mesh="dp=2,tp=2,ep=2"), batch=batch,
                    context=context, weights_format="float32", kv_dtype="float32")
    c = doc["breakdown"]["colocated"]
    assert c["kv_cache"] == 4 * (batch // 2) * (2 * 64 + 3 * 8) * 2 * (2 // 2) * 16
    assert compiled.argument_size_in_bytes == c["weights"]["total"] + c["kv_cache"] + 2 * 4 * 4
