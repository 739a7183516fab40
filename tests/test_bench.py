"""The decode benchmark harness: its byte accounting by hand, and the CLI report."""

import json

import pytest

from step3_jax.cli import app as cli
from step3_jax.model.config import load_config
from step3_jax.runtime import bench


def test_expected_distinct_experts():
    assert bench.expected_distinct_experts(48, 3, 1) == pytest.approx(3.0)
    assert bench.expected_distinct_experts(48, 3, 2) == pytest.approx(48 * (1 - (45 / 48) ** 2))
    assert bench.expected_distinct_experts(48, 3, 10_000) == pytest.approx(48.0)


def test_bytes_per_step_by_hand(tiny_cfg):
    """tiny: H 64, 4 layers (dense 0 and 3), heads 4 x 16, Q 32, FFN 96, 8 experts of 32, V 256."""
    got = bench.bytes_per_step(tiny_cfg, batch=1, capacity=64)
    attn = 64 * 32 + 2 * 64 * 16 + 32 + 32 * 64 + 64 * 64  # q, k, v, inter_norm, wq, o_proj
    norms = 2 * 64
    dense = 3 * 64 * 96
    moe = 64 * 8 + 3 * 64 * 32  # router + shared expert
    # + final norm, LM head, and the one embedding row the step gathers
    weights = 4 * (attn + norms) + 2 * dense + 2 * moe + 64 + 64 * 256 + 64
    assert got["weights"] == 4 * weights
    assert got["experts"] == pytest.approx(4 * 2 * 3 * (3 * 64 * 32))  # 2 MoE layers x 3 experts
    assert got["kv"] == 4 * 4 * 2 * 1 * 64 * 16
    assert got["total"] == pytest.approx(got["weights"] + got["experts"] + got["kv"])


def test_bench_cli_json(capsys):
    code = cli.main(["bench", "--config", "tiny", "--batch", "3", "--prompt-len", "5",
                     "--new-tokens", "4", "--repeats", "2", "--flush-mb", "0", "--json", "-q"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"decode_step_ms", "decode_tokens_per_s", "prefill_ms", "compile_s", "bytes_per_step",
            "peak_bandwidth_gbs", "mbu"} <= set(out)
    expected = out["bytes_per_step"] / (out["decode_step_ms"] / 1e3) / (
        out["peak_bandwidth_gbs"] * 1e9)
    assert out["mbu"] == pytest.approx(expected)
    assert out["bytes_per_step"] == bench.bytes_per_step(load_config("tiny"), 3,
                                                         out["cache_capacity"])["total"]


def test_bench_bad_flags(capsys):
    assert cli.main(["bench", "--config", "tiny", "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert cli.main(["bench", "--config", "tiny", "--prompt-len", "500", "--new-tokens", "20"]) == 2
    assert "exceeds the context (512)" in capsys.readouterr().err
