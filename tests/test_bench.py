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


def test_an_mbu_over_1_is_flagged_in_the_report_and_on_stderr(capsys, monkeypatch):
    """Issue 17: a probe slowed by a busy machine gave MBU 2.099. Here the probe reports
    1 MB/s, so the tiny step reads "faster" than the machine and the MBU is far over 1."""
    def slow_probe(repeats, flush, seed=0):
        return {"layout": "out_in", "gb_per_s": 1e-3,
                "gb_per_s_by_layout": {"in_out": 1e-3, "out_in": 1e-3}}

    monkeypatch.setattr(bench, "roofline", slow_probe)
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: None)
    code = cli.main(["bench", "--config", "tiny", "--batch", "2", "--prompt-len", "5",
                     "--new-tokens", "3", "--repeats", "1", "--flush-mb", "0", "--json", "-q"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 0 and out["mbu"] > 1 and out["mbu_over_1"] is True
    assert out["cache_bytes"] is None and out["fits_in_cache"] is None  # "unknown"
    (warning,) = out["warnings"]
    assert warning.startswith(f"MBU {out['mbu']:.3f} is over 1, which cannot be right")
    assert captured.err.splitlines() == [f"step3-jax: {warning}"]


@pytest.mark.parametrize("cache, fits", [(None, None), (10 ** 9, True), (10 ** 3, False)])
def test_whether_a_steps_bytes_fit_in_the_cache(monkeypatch, cache, fits):
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: cache)
    got = bench.plausibility(2e6, 0.5, 1.0, 4.0, "cpu")
    assert got["mbu_over_1"] is False and got["cache_bytes"] == cache
    assert got["fits_in_cache"] is fits
    assert len(got["warnings"]) == (1 if fits else 0)
    assert bench.plausibility(2e6, 0.5, 1.0, 4.0, "gpu")["cache_bytes"] is None  # not the CPU's


def test_last_level_cache_from_sysfs(tmp_path, monkeypatch):
    for index, size in [("index0", "32K"), ("index2", "512K"), ("index3", "32768K")]:
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert bench.last_level_cache_bytes(str(tmp_path)) == 32 * 2 ** 20

    def unknown(name):
        raise ValueError(name)

    monkeypatch.setattr(bench.os, "sysconf", unknown)
    assert bench.last_level_cache_bytes(str(tmp_path / "absent")) is None


def test_bench_help_names_the_model_it_runs_without_flags(capsys):
    """Issue 17: ``bench --help`` said "with neither, the demo model"; bench runs the ``bench``
    preset (its context, 8192, names it in the error below)."""
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with neither, the 'bench' preset with seeded random weights" in text
    assert "demo model" not in text
    assert "or an orbax store written by `step3-jax convert`" in text
    assert cli.main(["bench", "--prompt-len", "8192", "--new-tokens", "1"]) == 2
    assert "exceeds the context (8192)" in capsys.readouterr().err
