"""tools/bench_decode.py (the decode sweep) and tools/bench_peer.py (the eager-PyTorch peer).

The sweep's bookkeeping and its JAX side need no torch; the peer's tests are skipped when torch is
absent (it is a benchmark-only dependency: ``pip install -e '.[peer]'``; CI does not install it).
"""

import dataclasses
import json
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_decode as bd  # noqa: E402

from step3_jax.runtime import bench  # noqa: E402
from step3_jax.runtime.generate import generate  # noqa: E402


def _row(context, batch, mbu, ratio=None):
    row = {"context": context, "batch": batch, "bytes": {"distinct_experts_per_layer": 3.0},
           "bytes_per_step": 6e8, "peak_gbs": 20.0, "roofline_tokens_per_s": 33.3,
           "ours_tokens_per_s": 20.0, "ours_mbu": mbu}
    if ratio is not None:
        row.update(peer_tokens_per_s=20.0 / ratio, peer_mbu=mbu / ratio, ours_over_peer=ratio)
    return row


def test_targets_met_and_missed():
    rows = [_row(128, 1, 0.65, 2.0), _row(128, 16, 0.62, 1.2), _row(1024, 1, 0.1, 0.5)]
    got = {t["target"]: t for t in bd.targets(rows, new_tokens=32)}
    assert len(got) == 4
    assert not got["batch 1: MBU"]["met"]
    assert got["batch 1: MBU"]["shortfall"] == pytest.approx(0.05)
    assert got["batch 16: fraction of the roofline"]["met"]
    assert got["batch 1: ours / peer tokens/s"]["met"]
    assert got["batch 16: ours / peer tokens/s"]["shortfall"] == pytest.approx(0.3)
    # The targets are stated for 32 new tokens and context 128 only.
    assert bd.targets(rows, new_tokens=8) == []
    assert bd.targets([_row(1024, 1, 0.9, 3.0)], new_tokens=32) == []


def test_markdown_table_with_and_without_peer():
    skipped = {"context": 4096, "batch": 64, "skipped": "needs 9 GB"}
    text = bd.markdown_table([_row(1024, 4, 0.5), skipped, _row(128, 1, 0.65, 2.5)])
    lines = text.strip().splitlines()
    assert len(lines) == 5  # header, rule, three rows
    assert all(line.count("|") == 12 for line in lines)  # 11 columns each
    assert lines[4].startswith("| 4096 | 64 | skipped |")
    assert lines[2].startswith("| 128 | 1 |") and lines[2].endswith("| 65% | 26% | 2.50× |")
    assert lines[3].startswith("| 1024 | 4 |") and lines[3].endswith("| 50% | — | — |")


def test_derive_median_and_best():
    raw = {"context": 128, "batch": 4, "bytes_per_step": 1e9, "roofline_gbs_before": 20.0,
           "roofline_gbs_after": 10.0, "ours_runs_ms": [100.0, 80.0, 90.0],
           "peer_steps_ms": [300.0, 310.0, 900.0, 200.0, 220.0, 800.0], "peer_steps_per_run": 3}
    med = bd.derive(raw, "median")
    assert med["peak_gbs"] == 15.0 and med["ours_step_ms"] == 90.0
    assert med["peer_step_ms"] == 305.0  # median of all six steps
    assert med["ours_tokens_per_s"] == pytest.approx(4 * 1e3 / 90.0)
    assert med["ours_mbu"] == pytest.approx(1e9 / 0.090 / 15e9)
    assert med["roofline_tokens_per_s"] == pytest.approx(4 * 15e9 / 1e9)
    best = bd.derive(raw, "best")
    assert best["peak_gbs"] == 20.0 and best["ours_step_ms"] == 80.0
    assert best["peer_step_ms"] == 220.0  # the run (200, 220, 800) has the lower median
    assert best["ours_over_peer"] == pytest.approx(220.0 / 80.0)
    assert "peer_step_ms" not in bd.derive({k: v for k, v in raw.items()
                                            if not k.startswith("peer")}, "best")


def test_must_read_bytes(tiny_cfg):
    """KV at the mean length over the decode; routed experts scaled to the measured count."""
    plain = bench.bytes_per_step(tiny_cfg, batch=4, capacity=100 + 4.5)
    got = bd.must_read_bytes(tiny_cfg, batch=4, context=100, new_tokens=8, distinct=None)
    assert got["total"] == pytest.approx(plain["total"])
    assert got["kv"] == 4 * tiny_cfg.num_hidden_layers * 2 * 4 * 104.5 * tiny_cfg.head_dim
    measured = bd.must_read_bytes(tiny_cfg, batch=4, context=100, new_tokens=8, distinct=5.0)
    per_expert_all_layers = 4 * 3 * 64 * 32 * len(tiny_cfg.moe_layers)
    assert measured["experts"] == pytest.approx(5.0 * per_expert_all_layers)
    assert measured["total"] == pytest.approx(plain["weights"] + plain["kv"] + measured["experts"])


def test_shared_prefix_decode_is_greedy_generation():
    """The sweep's JAX side (prefill one prompt, tile its cache, run generate's decode loop from
    each row's own token) produces what ``generate`` does for prompt + that token."""
    import step3_jax

    params, cfg = step3_jax.load(config="tiny", seed=0, progress=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, cfg.vocab_size, size=12)
    first = np.array([5, 77, 200])
    ours = bd.Ours(params, cfg)
    prefix, _ = ours.prefix(prompt, capacity=64)
    _, tokens, _ = ours.decode(prefix, first, 5)
    results, _ = generate(params, cfg, [list(prompt) + [int(f)] for f in first],
                          max_new_tokens=5, eos_ids=[])
    assert tokens.tolist() == [r.generated_ids for r in results]
    _, again, _ = ours.decode(prefix, first, 5)  # the prefix survives the donated decode
    assert np.array_equal(again, tokens)


def test_sweep_jax_side_json(capsys):
    code = bd.main(["--config", "tiny", "--no-peer", "--batches", "3", "--contexts", "8",
                    "--new-tokens", "3", "--repeats", "1", "--flush-mb", "0", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads(captured.out)
    rows = report["results"]
    assert [(r["context"], r["batch"]) for r in rows] == [(8, 3)]
    for r in rows:
        assert r["ours_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ours_step_ms"])
        assert r["ours_mbu"] == pytest.approx(
            r["bytes_per_step"] / (r["ours_step_ms"] / 1e3) / (r["peak_gbs"] * 1e9))
        assert r["roofline_tokens_per_s"] == pytest.approx(
            r["batch"] * r["peak_gbs"] * 1e9 / r["bytes_per_step"])
        assert "peer_tokens_per_s" not in r
    assert "| 8 | 3 |" in captured.err  # the table goes to stderr with --json


def test_sweep_bad_flags(capsys):
    with pytest.raises(SystemExit):
        bd.main(["--config", "tiny", "--no-peer", "--contexts", "510", "--new-tokens", "4"])
    assert "exceeds the config's context (512)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bd.main(["--batches", "0"])
    assert "expected positive integers" in capsys.readouterr().err


# ----- the peer (needs torch) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def peer_setup():
    pytest.importorskip("torch", reason="torch is benchmark-only (pip install -e '.[peer]'); "
                                        "the peer tests need it")
    import bench_peer as bp

    import step3_jax

    params, cfg = step3_jax.load(config="tiny", seed=0, progress=False)
    return bp, params, cfg, bp.build(params, cfg)


def test_peer_weights_are_to_hub(peer_setup):
    """The peer's tensors (zero-copy views of ours) are ``checkpoint.to_hub``'s, in both expert
    layouts; stacked experts come as per-expert views."""
    from step3_jax.checkpoint.hub import to_hub
    from step3_jax.model.weights import stack_experts

    bp, params, cfg, _ = peer_setup
    hub = to_hub(params, cfg)
    for layout in (params, stack_experts(params)):
        ours = bp.hub_tensors(layout, cfg)
        assert ours.keys() == hub.keys()
        for name, value in hub.items():
            got = ours[name]
            got = np.stack([w.numpy() for w in got]) if isinstance(got, list) else got.numpy()
            assert np.array_equal(got, value), name


def test_peer_matches_our_model(peer_setup):
    bp, params, cfg, peer = peer_setup
    prompts = np.random.default_rng(1).integers(2, cfg.vocab_size, size=(3, 10))
    report = bp.verify(peer, params, cfg, prompts, new_tokens=5)
    # float32 on both sides, different summation orders: ~1e-6 of the logit scale measured.
    assert report["prefill_max_scaled_err"] < 1e-5
    assert report["decode_max_scaled_err"] < 1e-5
    assert report["greedy_tokens_match"]


def test_peer_verification_can_fail(peer_setup):
    """A peer with a wrong formula (router weights renormalised) is refused."""
    bp, params, cfg, _ = peer_setup
    wrong = bp.build(params, dataclasses.replace(cfg, norm_expert_weight=True))
    prompts = np.random.default_rng(1).integers(2, cfg.vocab_size, size=(3, 10))
    with pytest.raises(bp.PeerMismatch, match="no time reported"):
        bp.verify(wrong, params, cfg, prompts, new_tokens=5)


def test_peer_shared_prefix_decode_matches_ours(peer_setup):
    """The sweep's two sides decode the same tokens from the same shared prefix."""
    bp, params, cfg, peer = peer_setup
    import torch

    prompt = np.random.default_rng(2).integers(2, cfg.vocab_size, size=9)
    first = np.array([3, 100, 249, 17])
    ours = bd.Ours(params, cfg)
    prefix, _ = ours.prefix(prompt, capacity=64)
    _, ours_tokens, _ = ours.decode(prefix, first, 6)
    with torch.inference_mode():
        _, cache = peer.forward(torch.as_tensor(prompt[None]), None)
        peer_tokens, cache = bp.greedy(peer, bp.tile_cache(cache, 4), first, 6)
    assert np.array_equal(peer_tokens[:, 0], first)
    assert np.array_equal(peer_tokens[:, 1:], ours_tokens)
    assert cache[0][0].shape == (4, 1, 9 + 6, cfg.head_dim)  # grown by torch.cat per step


def test_peer_cli_json(peer_setup, capsys):
    bp = peer_setup[0]
    code = bp.main(["--config", "tiny", "--batch", "2", "--prompt-len", "12", "--new-tokens", "4",
                    "--repeats", "1", "--flush-mb", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["verification"]["greedy_tokens_match"]
    assert out["decode_tokens_per_s"] == pytest.approx(2 * 1e3 / out["decode_step_ms"])
    assert len(out["steps_ms"]) == 3  # one timed run of 4 new tokens: 3 decode steps
