"""``step3-jax plan``: the memory arithmetic by hand, against XLA's memory analysis, and the CLI.

The expected numbers below are written out from the configs' dimensions, not from the code:
``tiny`` is H 64, 4 layers (dense, MoE, MoE, dense), 4 heads of 16 from a 32-d query, dense FFN
96, 8 experts of 32 (top-3) + a shared expert of 32, vocabulary 250 padded to 256.
"""

import json

import pytest

from step3_jax.analysis import compiled, deployment, plan
from step3_jax.errors import Step3Error
from step3_jax.model.config import load_config

from conftest import run_cli

# tiny, per layer: q_proj 64x32, k_proj and v_proj 64x16, wq 32x4x16, o_proj 4x16x64
MFA = 64 * 32 + 2 * 64 * 16 + 32 * 4 * 16 + 4 * 16 * 64          # 10,240 per layer
NORMS = 4 * (32 + 64 + 64) + 64                                   # inter, input, post; final
DENSE = 3 * 64 * 96                                               # per dense layer (2 of them)
ROUTER = 64 * 8                                                   # per MoE layer (2 of them)
EXPERTS = 3 * 8 * 64 * 32                                         # per MoE layer
SHARED = 3 * 64 * 32                                              # per MoE layer
VOCAB = 256 * 64                                                  # embedding; LM head the same


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


def test_parameter_total_matches_the_config(tiny):
    total = 4 * MFA + NORMS + 2 * DENSE + 2 * (ROUTER + EXPERTS + SHARED) + 2 * VOCAB
    assert total == 222_912  # the README's "222K" (with the vocabulary padding)
    doc = plan.plan(tiny, deployment.Placement(), batch=1, context=1, weights_format="bf16",
                    kv_dtype="bf16")
    assert doc["breakdown"]["colocated"]["weights"]["total"] == 2 * total


def test_afd_fp8_by_hand(tiny):
    """AFD 2:2 (FFN ep=2), FP8 weights and KV, batch 12 at context 256 in 3 micro-batches."""
    doc = plan.plan(tiny, deployment.parse_placement("2:2"), batch=12, context=256,
                    weights_format="fp8", kv_dtype="fp8")
    a, f = doc["breakdown"]["attention"], doc["breakdown"]["ffn"]
    # Attention devices hold their weights whole. Each MFA matrix fits one 128x128 block:
    # 5 scales per layer. Embedding, LM head, router and norms BF16.
    assert a["weights"] == {"mfa_projections": 4 * MFA, "fp8_scales": 4 * 5 * 4,
                            "embedding": 2 * VOCAB, "lm_head": 2 * VOCAB, "norms": 2 * NORMS,
                            "router": 2 * 2 * ROUTER,
                            "total": 4 * MFA + 80 + 4 * VOCAB + 2 * NORMS + 4 * ROUTER}
    # FFN devices: half of the experts (ep=2), the shared experts and dense FFNs whole (tp=1).
    # Scales: an expert's matrix is one block, 4 local experts x 3 matrices x 2 layers; shared
    # and dense: 3 matrices x 2 layers each.
    assert f["weights"] == {"routed_experts": EXPERTS, "shared_expert": 2 * SHARED,
                            "dense_ffn": 2 * DENSE, "fp8_scales": 4 * (24 + 6 + 6),
                            "total": EXPERTS + 2 * SHARED + 2 * DENSE + 144}
    # 12 sequences, 3 micro-batches of 4, 2 per attention device each: 6 per device.
    assert a["sequences_per_device"] == 6
    assert a["kv_cache"] == 6 * 256 * (4 * 2 * 16) * 1
    assert f["kv_cache"] == 0
    assert doc["attention_device_bytes"] == a["total"] != doc["ffn_device_bytes"]


def test_colocated_mesh_by_hand(tiny):
    """dp=2, tp=2, ep=2, BF16: tp splits heads, the vocabulary and every FFN width, ep the
    experts (and the router's expert axis); q_proj, k/v and the norms stay whole."""
    doc = plan.plan(tiny, deployment.parse_placement(mesh="dp=2,tp=2,ep=2"), batch=8, context=128,
                    weights_format="bf16", kv_dtype="bf16")
    c = doc["breakdown"]["colocated"]
    mfa = 64 * 32 + 2 * 64 * 16 + 32 * 4 * 16 // 2 + 4 * 16 * 64 // 2
    assert c["weights"] == {"mfa_projections": 2 * 4 * mfa, "norms": 2 * NORMS,
                            "embedding": 2 * VOCAB // 2, "lm_head": 2 * VOCAB // 2,
                            "dense_ffn": 2 * 2 * DENSE // 2, "router": 2 * 2 * ROUTER // 2,
                            "routed_experts": 2 * 2 * EXPERTS // 4,
                            "shared_expert": 2 * 2 * SHARED // 2, "total": 190_848}
    assert c["kv_cache"] == 4 * 128 * (4 * 2 * 16) * 2  # 8 sequences over dp=2
    # Colocated plans report both roles on the same devices.
    assert doc["attention_device_bytes"] == doc["ffn_device_bytes"] == c["total"]


def test_activations_by_hand(tiny):
    """One device, 2 sequences at context 64, BF16 activations, the ragged kernel."""
    acts = plan.activations(tiny, deployment.Placement(), 2, 64, act=2, kernel="ragged",
                            weight_bytes_per_value=1)["colocated"]
    b = 2
    attention = b * 4 * 64 * (3 * 4 + 2) + b * (32 + 2 * 4 * 16 + 2 * 16 + 64) * 2
    moe = (2 * b * 8 * 4 + b * 64 * 4 + 2 * b * 32 * 2 + b * 3 * (2 * 64 + 2 * 32) * 2
           + b * 64 * 2)
    head = b * 64 * 2 + 7 * b * 256 * 4  # normed hidden; 7 float32 arrays over the vocabulary
    assert acts == {"residual_stream": 2 * b * 64 * 2, "attention_layer": attention,
                    "moe_layer": moe, "dense_layer": b * (2 * 96 + 64) * 2,
                    "lm_head_and_sampling": head,
                    "peak_phase": "lm_head_and_sampling", "total": 2 * b * 64 * 2 + head}


def test_paper_2a2f_by_hand():
    """The full model on the paper's 2A2F: 16 + 16 devices, FP8, 6144 sequences at 4K."""
    doc = plan.plan(load_config("step3"), deployment.parse_placement("2A2F"), batch=6144,
                    context=4096, weights_format="fp8", kv_dtype="fp8")
    a, f = doc["breakdown"]["attention"], doc["breakdown"]["ffn"]
    H, L = 7168, 61
    mfa = H * 2048 + 2 * H * 256 + 2048 * 64 * 256 + 64 * 256 * H
    assert a["weights"]["mfa_projections"] == L * mfa == 10_330_046_464
    assert a["weights"]["embedding"] == a["weights"]["lm_head"] == 2 * 128_896 * H
    # 6144 / 3 micro-batches / 16 devices = the paper's 128 tokens per GPU per micro-batch.
    assert a["sequences_per_device"] == 3 * 128
    assert a["kv_cache"] == 384 * 4096 * L * 512  # 512 B per token and layer in FP8
    assert f["weights"]["routed_experts"] == 56 * 3 * 3 * H * 5120   # 3 of 48 experts each
    assert f["weights"]["shared_expert"] == 56 * 3 * H * 5120       # whole (tp=1)
    assert doc["fits"] and 0.75 < doc["attention_device_bytes"] / 80e9 < 0.85
    # The LM head samples a device's 3 micro-batches at once (afd_schedule.next_tokens): 384 rows.
    acts = plan.activations(load_config("step3"), deployment.parse_placement("2A2F"), 6144, 4096,
                            act=2, kernel="loop", weight_bytes_per_value=1)["attention"]
    assert acts["lm_head_and_sampling"] == 384 * H * 2 + 7 * 384 * 128_896 * 4


def test_max_batch_is_the_boundary(tiny):
    kw = dict(weights_format="bf16", kv_dtype="bf16")
    placement = deployment.parse_placement("2:2")
    memory = plan.plan(tiny, placement, batch=60, context=512, **kw)["attention_device_bytes"]
    best = plan.max_batch(tiny, placement, context=512, device_memory=memory, **kw)
    assert best >= 60
    assert plan.plan(tiny, placement, batch=best, context=512, device_memory=memory, **kw)["fits"]
    assert not plan.plan(tiny, placement, batch=best + 1, context=512, device_memory=memory,
                         **kw)["fits"]


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30),
                                           ("1.5 TB", 1.5e12), ("85899345920", 85899345920),
                                           ("512MiB", 512 * 2**20)])
def test_parse_bytes(text, expected):
    assert deployment.parse_bytes(text) == expected


# ----- against the compiled memory analysis -------------------------------------------------------
#
# Arguments (weights, KV cache, decode state and inputs per device) must equal XLA's to the byte.
# Temporaries are an estimate: it counts every [tokens, heads, context] float32 array the MFA code
# defines (scores, masked scores, exponentials, probabilities); XLA:CPU keeps between two (tiny,
# measured) and all four (bench) of them live. Where they dominate, the compiled temporaries lie
# between two of them and the estimate; the small buffers the estimate leaves out (masks,
# indices) stay below the two arrays it counts and XLA drops at these sizes. The FFN and
# LM-head-and-sampling programs have no such dominant term: XLA fuses some of the buffers counted
# (the SwiGLU product, the sort's masked copy) and adds small ones (the normed input), measured
# 0.64-0.84x here (0.8-1.1x on the full model).

def _scores(b, heads, context):
    return b * heads * context * 4


def test_compiled_colocated_decode_loop(tiny):
    placement = deployment.parse_placement(mesh="dp=2,tp=2,ep=2")
    out = compiled.compiled_check(tiny, placement, batch=64, context=512)
    (p,) = out["programs"]
    assert p["compiled"]["arguments"] == p["plan"]["arguments"]
    assert p["compiled"]["aliased"] > plan.plan(
        tiny, placement, batch=64, context=512, weights_format="float32",
        kv_dtype="float32")["breakdown"]["colocated"]["kv_cache"]  # the cache is donated
    two = 2 * _scores(32, 2, 512)
    assert two <= p["compiled"]["temps"] <= p["plan"]["temps"]


def test_compiled_afd_programs(tiny):
    placement = deployment.parse_placement("4:4", ffn_mesh="ep=2,tp=2")
    out = compiled.compiled_check(tiny, placement, batch=96, context=512)
    assert out["devices"] == 8
    names = [p["program"] for p in out["programs"]]
    assert names == ["attention step (MoE layer 1)", "FFN step (MoE layer 1)",
                     "attention step (dense layer 0)", "FFN step (dense layer 0)",
                     "LM head and sampling (afd_schedule.next_tokens)"]
    for p in out["programs"]:
        assert p["compiled"]["arguments"] == p["plan"]["arguments"], p["program"]
        temps = p["compiled"]["temps"]
        if p["program"].startswith("attention"):
            assert 2 * _scores(8, 4, 512) <= temps <= p["plan"]["temps"], p["program"]
        else:
            assert 0.5 <= temps / p["plan"]["temps"] <= 1.3, p["program"]


# ----- the command line ---------------------------------------------------------------------------

PAPER = ("plan", "--afd", "2A2F", "--batch", "6144", "--context", "4096", "--weights", "fp8",
         "--kv-dtype", "fp8", "--compiled-check", "off")


def test_cli_json_shape(capsys):
    code, out, err = run_cli(capsys, *PAPER, "--json")
    assert code == 0, err
    doc = json.loads(out)
    for key in ("attention_device_bytes", "ffn_device_bytes", "device_memory_bytes", "fits",
                "breakdown", "max_batch", "notes", "compiled"):
        assert key in doc
    assert doc["device_memory_bytes"] == 80 * 10**9 and doc["fits"] is True
    assert set(doc["breakdown"]) == {"attention", "ffn"}
    assert doc["placement"] == {"kind": "afd", "attention_devices": 16, "ffn_devices": 16,
                                "ffn_mesh": {"ep": 16, "tp": 1}, "micro_batches": 3}
    assert doc["compiled"] is None


def test_cli_text_and_colocated_roles(capsys):
    code, out, _ = run_cli(capsys, "plan", "--config", "tiny", "--mesh", "dp=2,tp=2",
                           "--batch", "8", "--context", "128", "--weights", "bf16",
                           "--kv-dtype", "bf16", "--compiled-check", "on")
    assert code == 0
    assert "fits" in out and "compiled check (4 emulated" in out
    assert "decode loop (generate._decode)" in out


def test_cli_mesh_bigger_than_this_machine_is_a_plan(capsys):
    code, out, err = run_cli(capsys, "plan", "--config", "tiny", "--mesh", "dp=64,ep=8",
                             "--batch", "640", "--context", "512", "--weights", "bf16",
                             "--kv-dtype", "bf16", "--compiled-check", "off", "--json")
    assert code == 0, err
    c = json.loads(out)["breakdown"]["colocated"]
    assert c["devices"] == 512 and c["sequences_per_device"] == 10


def test_cli_compiled_check_in_a_child_process(capsys):
    """12 devices: more than this process has (8), so a child gets 12 emulated devices."""
    code, out, err = run_cli(capsys, "plan", "--config", "tiny", "--afd", "8:4",
                             "--batch", "36", "--context", "256", "--weights", "fp8",
                             "--kv-dtype", "fp8", "--json")
    assert code == 0, err
    c = json.loads(out)["compiled"]
    assert c["devices"] == 12 and len(c["programs"]) == 5
    assert all(p["compiled"]["arguments"] == p["plan"]["arguments"] for p in c["programs"])
    assert "child process" in err


@pytest.mark.parametrize("argv,message", [
    (("--afd", "0:2"), "--afd must be A:F with positive integers"),
    (("--afd", "2:2", "--mesh", "dp=2"), "--afd and --mesh are exclusive"),
    (("--mesh", "dp=2", "--micro-batches", "3"), "--micro-batches needs --afd"),
    (("--mesh", "dp=2", "--ffn-mesh", "ep=2"), "--ffn-mesh needs --afd"),
    (("--afd", "2:4", "--ffn-mesh", "ep=2"), "--ffn-mesh ep=2,tp=1 uses 2 devices"),
    (("--mesh", "ep=3"), "does not divide the experts axis (8)"),
    (("--mesh", "dp=2", "--device-memory", "lots"), "--device-memory must be a positive size"),
    (("--mesh", "dp=2", "--device-memory", "0GB"), "--device-memory must be a positive size"),
    (("--mesh", "dp=2", "--batch", "0"), "--batch must be >= 1"),
    (("--mesh", "dp=2", "--context", "4096"), "exceeds the model's context"),
])
def test_cli_errors(capsys, argv, message):
    base = {"--batch": "8", "--context": "64"}
    args = list(argv)
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    code, out, err = run_cli(capsys, "plan", "--config", "tiny", "--weights", "fp8",
                             "--kv-dtype", "fp8", "--compiled-check", "off", *args)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_library_errors(tiny):
    with pytest.raises(Step3Error, match="--compiled-check"):
        compiled.plan_document(tiny, deployment.Placement(), batch=1, context=8,
                               weights_format="fp8", kv_dtype="fp8", device_memory=10**9,
                               compiled="maybe")


def test_auto_skips_only_the_slow_colocated_compile(capsys):
    """ep=1 on Step-3 would compile 56 x 48 per-expert branches: auto skips it, with a reason."""
    code, out, err = run_cli(capsys, "plan", "--mesh", "dp=4", "--batch", "64", "--context",
                             "1024", "--weights", "fp8", "--kv-dtype", "fp8", "--json")
    assert code == 0, err
    assert "2688 per-expert branches" in json.loads(out)["compiled"]["skipped"]
