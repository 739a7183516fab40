"""Conversion: Hub (bf16 / block-FP8) -> orbax store -> Hub, FP8 dequantization, sharded restore.

The FP8 reference here is written from ``shared/spec/model.md`` §3 with explicit block loops,
independently of ``step3_jax.model.quant``: ``w[r, c] = fp8[r, c] * scale[r // 128, c // 128]``.
"""

import json
import logging
import os
import shutil
import stat
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from step3_jax.checkpoint import store, streaming
from step3_jax.checkpoint.convert import convert, export
from step3_jax.checkpoint.hub import HubReader
from step3_jax.checkpoint.loader import load
from step3_jax.errors import CheckpointError
from step3_jax.model import quant
from step3_jax.model.decoder import forward
from step3_jax.model.sharding import parse_mesh
from step3_jax.model.weights import stack_experts
from step3_jax.runtime import afd
from step3_jax.runtime.generate import generate

from conftest import run_cli, write_hub_checkpoint

TOKENS = jnp.array([[1, 5, 9, 2, 7, 3]])


def _logits(params, cfg):
    logits, _ = forward(params, TOKENS, None, cfg)
    return np.asarray(logits)[..., : cfg.vocab_size]


def _reference_dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    out = values.astype(np.float32)
    lead = values.shape[:-2]
    rows, cols = values.shape[-2:]
    for idx in np.ndindex(*lead) if lead else [()]:
        for br in range(scales.shape[-2]):
            for bc in range(scales.shape[-1]):
                block = idx + (slice(br * 128, min((br + 1) * 128, rows)),
                               slice(bc * 128, min((bc + 1) * 128, cols)))
                out[block] = values[block].astype(np.float32) * scales[idx + (br, bc)]
    return out


def _reference_quantize(w: np.ndarray):
    """absmax/448 scales per 128x128 block (ragged edges), e4m3 values."""
    lead, (rows, cols) = w.shape[:-2], w.shape[-2:]
    grid = lead + (-(-rows // 128), -(-cols // 128))
    scales = np.ones(grid, np.float32)
    values = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for idx in np.ndindex(*lead) if lead else [()]:
        for br in range(grid[-2]):
            for bc in range(grid[-1]):
                block = idx + (slice(br * 128, (br + 1) * 128), slice(bc * 128, (bc + 1) * 128))
                amax = np.abs(w[block]).max()
                scale = amax / 448.0 if amax > 0 else 1.0
                scales[idx + (br, bc)] = scale
                values[block] = (w[block] / np.float32(scale)).astype(ml_dtypes.float8_e4m3fn)
    return values, scales


FP8_NAMES = ("q_proj", "k_proj", "v_proj", "wq", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fp8_state(state: dict) -> tuple[dict, dict]:
    """A block-FP8 Hub state (the rule of model.md §3: matmul weights FP8, router/embedding/LM
    head/norms BF16) and the float32 weights it dequantizes to."""
    fp8, dequant = {}, {}
    for name, w in state.items():
        if name.endswith(".weight") and w.ndim >= 2 and name.split(".")[-2] in FP8_NAMES:
            values, scales = _reference_quantize(np.asarray(w, np.float32))
            fp8[name], fp8[name + "_scale_inv"] = values, scales
            dequant[name] = _reference_dequantize(values, scales)
        else:  # BF16, as in the real FP8 checkpoint
            fp8[name] = np.asarray(w, np.float32).astype(ml_dtypes.bfloat16)
            dequant[name] = fp8[name].astype(np.float32)
    return fp8, dequant


@pytest.fixture(scope="module")
def bf16_state(hub_state):
    return {k: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16) for k, v in hub_state.items()}


@pytest.fixture(scope="module")
def fp8_hub(tmp_path_factory, tiny_raw, hub_state):
    fp8, dequant = _fp8_state(hub_state)
    root = tmp_path_factory.mktemp("fp8")
    raw = dict(tiny_raw, quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                              "weight_block_size": [128, 128]})
    return (write_hub_checkpoint(root / "fp8", raw, fp8, shards=2),
            write_hub_checkpoint(root / "dequant", tiny_raw, dequant))


# ----- FP8 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(200, 300), (3, 130, 257), (128, 128), (5, 7)])
def test_fp8_dequantization_matches_the_block_reference(shape):
    rng = np.random.default_rng(0)
    values = rng.normal(size=shape).astype(ml_dtypes.float8_e4m3fn)
    scales = rng.uniform(0.01, 2.0, size=quant.scale_grid(shape)).astype(np.float32)
    expected = _reference_dequantize(values, scales)
    np.testing.assert_array_equal(quant.dequantize_np(values, scales), expected)  # same f32 ops


def test_fp8_scale_with_the_wrong_block_grid_is_named():
    values = np.zeros((200, 300), ml_dtypes.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"w_scale_inv: block grid \[1, 3\] .* \(expected "
                                              r"\[2, 3\]"):
        quant.dequantize_np(values, np.ones((1, 3), np.float32), "w")


def test_fp8_hub_checkpoint_loads_to_its_dequantized_weights(fp8_hub, tiny_cfg):
    fp8_dir, dequant_dir = fp8_hub
    params, cfg = load(fp8_dir, progress=False)
    reference, _ = load(dequant_dir, progress=False)
    for a, b in zip(jax.tree.leaves(stack_experts(params)), jax.tree.leaves(
            stack_experts(reference))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fp8_store_runs_the_quantized_node_like_its_dequantized_weights(fp8_hub, tmp_path):
    """An fp8 store keeps e4m3 values + scales; the model dequantizes inside the matmul helper,
    so its logits equal those of the dequantized float32 weights up to float32 rounding of the
    same products (1e-5 on logits of magnitude ~3)."""
    fp8_dir, dequant_dir = fp8_hub
    convert(fp8_dir, tmp_path / "st", weights="fp8", progress=False)
    params, cfg = load(tmp_path / "st", progress=False)
    moe_layer = params.layers[cfg.moe_layers[0]]
    assert isinstance(moe_layer.attn.wq, quant.Fp8Weight)
    assert isinstance(moe_layer.ffn.gate[0], quant.Fp8Weight)  # per-expert layout on CPU
    assert moe_layer.attn.wq.values.dtype == jnp.float8_e4m3fn
    assert not isinstance(moe_layer.ffn.router, quant.Fp8Weight)
    reference, _ = load(dequant_dir, progress=False)
    np.testing.assert_allclose(_logits(params, cfg), _logits(reference, cfg), atol=1e-5)


def test_fp8_export_round_trips_values_and_scales(fp8_hub, tmp_path):
    fp8_dir, _ = fp8_hub
    convert(fp8_dir, tmp_path / "st", weights="fp8", progress=False)
    export(tmp_path / "st", tmp_path / "hub", progress=False)
    back, original = HubReader(tmp_path / "hub"), HubReader(fp8_dir)
    assert set(back.files) == set(original.files)
    for name in original.files:
        assert back.dtype(name) == original.dtype(name), name
        a, b = back.read(name), original.read(name)
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
        np.testing.assert_array_equal(a.view(bits), b.view(bits), err_msg=name)


# ----- bf16 / float32 round trips -------------------------------------------------------------------

def test_bf16_hub_to_orbax_to_hub_is_bit_exact(tmp_path, tiny_raw, bf16_state, capsys):
    hub = write_hub_checkpoint(tmp_path / "hub", tiny_raw, bf16_state, shards=3)
    (hub / "tokenizer.json").write_text("{}")
    code, out, err = run_cli(capsys, "convert", "--hf", str(hub), "--out", str(tmp_path / "st"),
                             "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["weights"] == "bfloat16" and "converting" in err  # progress on stderr
    assert (tmp_path / "st" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "st" / "config.json").read_text())["hidden_size"] == 64
    code, out, err = run_cli(capsys, "export", "--checkpoint", str(tmp_path / "st"), "--out",
                             str(tmp_path / "back"), "--json")
    assert code == 0, err
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    back = {}
    for file in sorted(set(index["weight_map"].values())):
        back.update(load_file(str(tmp_path / "back" / file)))
    assert set(back) == set(bf16_state)
    for name, value in bf16_state.items():
        assert back[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(back[name].view(np.uint16), value.view(np.uint16),
                                      err_msg=name)
    assert (tmp_path / "back" / "tokenizer.json").is_file()


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_converted_checkpoint_gives_the_hub_logits(tmp_path, hub_dir, tiny_raw, bf16_state,
                                                   weights):
    """float32 store of a float32 Hub checkpoint, bfloat16 store of a bfloat16 one: the same
    stored numbers, so the same logits exactly."""
    source = hub_dir if weights == "float32" else write_hub_checkpoint(
        tmp_path / "hub", tiny_raw, bf16_state)
    convert(source, tmp_path / "st", weights=weights, progress=False)
    hub_params, cfg = load(source, progress=False)
    st_params, st_cfg = load(tmp_path / "st", progress=False)
    assert st_cfg == cfg
    np.testing.assert_array_equal(_logits(st_params, cfg), _logits(hub_params, cfg))


# ----- streaming: a tensor at a time, whatever the layer size -----------------------------------

def _track(monkeypatch, owner, method: str) -> list[int]:
    """Wrap ``owner.method`` so that every array it returns is counted while alive; returns the
    list of live counts seen at each call (the arrays still held when the next one is read)."""
    original, alive, seen = getattr(owner, method), [0], []

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        for a in jax.tree.leaves(out):
            if isinstance(a, np.ndarray):
                alive[0] += 1
                weakref.finalize(a, lambda: alive.__setitem__(0, alive[0] - 1))
        seen.append(alive[0])
        return out

    monkeypatch.setattr(owner, method, counted)
    return seen


def test_batches_group_consecutive_sizes_within_the_limit():
    assert streaming.batches([5, 30, 40, 1, 1], limit=32) == [[0], [1], [2], [3, 4]]
    assert streaming.batches([], limit=32) == []


@pytest.mark.parametrize("weights", ["float32", "fp8"])
def test_convert_and_export_hold_about_one_tensor(monkeypatch, tmp_path, hub_dir, weights):
    """Issue 17 item 15: the converter held ~5 layers (a 968 MiB checkpoint of ~200 MB layers
    peaked at 0.96x its size). With batching off, conversion reads the next Hub tensor only once
    the previous one is written and freed (1 alive), and export restores the next weight while
    holding at most the one it just wrote (2 weights alive: the loop variable still names it;
    an FP8 weight is two arrays, values and scales)."""
    monkeypatch.setattr(streaming, "BATCH_BYTES", 0)
    reads = _track(monkeypatch, HubReader, "read")
    convert(hub_dir, tmp_path / "st", weights=weights, progress=False)
    assert len(reads) == 55 and max(reads) == 1, reads  # tiny: 55 tensors, one at a time
    restores = _track(monkeypatch, store.Reader, "_read")
    export(tmp_path / "st", tmp_path / "hub", progress=False)
    assert len(restores) == 55 and max(restores) <= (4 if weights == "fp8" else 2), restores
    back, source = HubReader(tmp_path / "hub"), HubReader(hub_dir)
    name = "model.layers.1.moe.down_proj.weight"
    if weights == "float32":
        np.testing.assert_array_equal(back.read(name), source.read(name))
    else:  # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself, so of the block max
        np.testing.assert_allclose(
            _reference_dequantize(back.read(name), back.read(name + "_scale_inv")),
            source.read(name), rtol=0, atol=2 ** -4 * np.abs(source.read(name)).max())


# ----- sharded restore ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, hub_dir):
    out = tmp_path_factory.mktemp("store") / "st"
    convert(hub_dir, out, weights="float32", progress=False)
    return out


def test_restore_onto_a_mesh_places_every_weight_and_matches(store_dir, tiny_params, tiny_cfg):
    mesh = parse_mesh("dp=2,tp=2,ep=2")
    params, cfg = load(store_dir, mesh=mesh, progress=False)
    wq = params.layers[0].attn.wq
    assert wq.sharding.spec == jax.sharding.PartitionSpec("tp", None, None)
    assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape == (2, 16, 32)
    gate = params.layers[cfg.moe_layers[0]].ffn.gate
    assert gate.addressable_shards[0].data.shape == (4, 16, 64)  # 8 experts / ep, 32 / tp
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    sharded, _ = generate(params, cfg, prompts, max_new_tokens=6)
    plain, _ = generate(tiny_params, tiny_cfg, prompts, max_new_tokens=6)
    assert [r.generated_ids for r in sharded] == [r.generated_ids for r in plain]


def test_restore_for_afd_puts_each_weight_on_its_group_only(store_dir, tiny_params, tiny_cfg):
    plan = afd.parse_plan("2:4", transfer_dtype="float32")
    shardings = afd.afd_shardings(tiny_cfg, plan)
    params, cfg = load(store_dir, shardings=shardings, expert_parallel=plan.ffn_ep,
                       progress=False)
    attn_ids = {d.id for d in jax.devices()[:2]}
    ffn_ids = {d.id for d in jax.devices()[2:6]}
    layer = params.layers[cfg.moe_layers[0]]
    assert {d.id for d in layer.attn.wq.sharding.device_set} == attn_ids
    assert {d.id for d in layer.ffn.router.sharding.device_set} == attn_ids
    assert {d.id for d in layer.ffn.gate.sharding.device_set} == ffn_ids
    model = afd.place(params, cfg, plan)
    assert model.ffn[cfg.moe_layers[0]].gate is layer.ffn.gate  # already placed: not copied
    got, _ = afd.generate(model, [[1, 2, 3]], max_new_tokens=5)
    want, _ = generate(tiny_params, tiny_cfg, [[1, 2, 3]], max_new_tokens=5)
    assert got[0].generated_ids == want[0].generated_ids


# ----- bad input: one line naming the culprit, exit 2, nothing loadable left at --out ---------------

def _convert_fails(capsys, hub, out, *fragments):
    code, stdout, err = run_cli(capsys, "convert", "--hf", str(hub), "--out", str(out))
    lines = [line for line in err.splitlines() if line.startswith("step3-jax: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_bad_inputs_are_named(capsys, tmp_path, tiny_raw, hub_state):
    out = tmp_path / "out"
    _convert_fails(capsys, tmp_path / "nope", out, "does not exist")

    missing = {k: v for k, v in hub_state.items() if k != "model.layers.1.moe.up_proj.weight"}
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "a", tiny_raw, missing), out,
                   "missing tensor model.layers.1.moe.up_proj.weight")

    unknown = dict(hub_state, **{"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)})
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "b", tiny_raw, unknown), out,
                   "unknown tensor model.layers.0.self_attn.q_norm.weight")

    shaped = dict(hub_state, **{"model.layers.0.self_attn.k_proj.weight":
                                np.zeros((64, 16), np.float32)})
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "c", tiny_raw, shaped), out,
                   "model.layers.0.self_attn.k_proj.weight", "expected shape [16, 64]",
                   "got [64, 16]")

    broken = write_hub_checkpoint(tmp_path / "d", tiny_raw, hub_state)
    (broken / "config.json").write_text("{broken")
    _convert_fails(capsys, broken, out, "config.json", "invalid JSON")

    sharded = write_hub_checkpoint(tmp_path / "e", tiny_raw, hub_state, shards=2)
    shard = sorted(sharded.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    _convert_fails(capsys, sharded, out, shard.name)

    listed = write_hub_checkpoint(tmp_path / "f", tiny_raw, hub_state, shards=2)
    index = json.loads((listed / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = sorted(
        set(index["weight_map"].values()))[0]
    (listed / "model.safetensors.index.json").write_text(json.dumps(index))
    _convert_fails(capsys, listed, out, "model.layers.0.extra.weight", "absent")


def test_a_tensor_that_cannot_be_read_while_writing_is_one_line(capsys, caplog, monkeypatch,
                                                                tmp_path, hub_dir):
    """A read that fails mid-conversion (headers were fine) stops the save before any of its
    batch's writes starts: one line, nothing at --out, and no traceback logged by orbax's writer
    thread."""
    original = HubReader.read

    def failing(self, name):
        if name == "model.layers.2.self_attn.wq.weight":
            raise CheckpointError(f"{name}: disk went away")
        return original(self, name)

    monkeypatch.setattr(HubReader, "read", failing)
    _convert_fails(capsys, hub_dir, tmp_path / "out",
                   "model.layers.2.self_attn.wq.weight: disk went away")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_fp8_scale_grid_mismatch_is_named_before_writing(capsys, tmp_path, tiny_raw, hub_state):
    fp8, _ = _fp8_state(hub_state)
    fp8["model.layers.0.self_attn.wq.weight_scale_inv"] = np.ones((2, 1), np.float32)
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "h", tiny_raw, fp8), tmp_path / "out",
                   "model.layers.0.self_attn.wq.weight_scale_inv", "block grid [2, 1]",
                   "expected [1, 1]")


def test_non_empty_out_needs_force_and_force_replaces(capsys, tmp_path, hub_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "convert", "--hf", str(hub_dir), "--out", str(out))
    assert code == 2 and "not empty" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "convert", "--hf", str(hub_dir), "--out", str(out), "--force",
                           "-q")
    assert code == 0, err
    assert store.is_store(out) and not (out / "keep.txt").exists()


def test_an_impossible_out_is_one_line(capsys, tmp_path, hub_dir, store_dir):
    """Issue 17 item 3: ``--out`` under /proc or under a regular file was a FileNotFoundError /
    FileExistsError traceback (exit 1); now one line naming the path and why, exit 2."""
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    for command in (["convert", "--hf", str(hub_dir)], ["export", "--checkpoint", str(store_dir)]):
        for out, why in (("/proc/x", "No such file or directory"),
                         (str(afile / "sub"), f"{afile} is not a directory")):
            code, stdout, err = run_cli(capsys, *command, "--out", out, "-q")
            assert code == 2 and stdout == "" and "Traceback" not in err, err
            assert err.strip() == f"step3-jax: error: cannot create output directory {out}" + (
                f" ({why})" if out == "/proc/x" else f": {why}"), err
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def _modes(root) -> set[tuple[bool, int]]:
    return {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_outputs_follow_the_umask(tmp_path, hub_dir, umask):
    """Issue 17 item 7: convert/export outputs were 0700 (tempfile's staging directory) whatever
    the umask, unreadable by colleagues on a shared disk. Every directory and file written
    (orbax's and tensorstore's included, and the copied tokenizer, whatever its own mode) now
    has the mode the umask gives a new one."""
    hub = tmp_path / "hub"
    shutil.copytree(hub_dir, hub)
    (hub / "tokenizer.json").write_text("{}")
    os.chmod(hub / "tokenizer.json", 0o600)
    previous = os.umask(umask)
    try:
        convert(hub, tmp_path / "st", weights="fp8", progress=False)
        export(tmp_path / "st", tmp_path / "back", progress=False)
    finally:
        os.umask(previous)
    want = {(True, 0o777 & ~umask), (False, 0o666 & ~umask)}
    assert _modes(tmp_path / "st") == want and _modes(tmp_path / "back") == want
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_interrupted_run_leaves_nothing_and_a_rerun_starts_clean(capsys, tmp_path, hub_dir,
                                                                 monkeypatch):
    out = tmp_path / "out"
    calls = []
    original = store.Writer.write_chunk

    def dying(self, name, chunk):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, name, chunk)

    monkeypatch.setattr(store.Writer, "write_chunk", dying)
    code, _, err = run_cli(capsys, "convert", "--hf", str(hub_dir), "--out", str(out))
    assert code == 130 and "interrupted" in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    monkeypatch.setattr(store.Writer, "write_chunk", original)
    # A killed run (no cleanup at all) leaves its temporary directory: the next run removes it.
    (tmp_path / ".out.partial-killed").mkdir()
    code, _, err = run_cli(capsys, "convert", "--hf", str(hub_dir), "--out", str(out), "-q")
    assert code == 0, err
    assert store.is_store(out) and not list(tmp_path.glob(".out.partial-*"))


def test_damaged_store_is_named(tmp_path, store_dir):
    damaged = tmp_path / "st"
    shutil.copytree(store_dir, damaged)
    shutil.rmtree(damaged / "layer_002")
    with pytest.raises(CheckpointError, match="layer_002"):
        load(damaged, progress=False)


def test_a_v1_store_is_refused_with_what_to_do(capsys, tmp_path, store_dir):
    """Stores written before the [out, in] layout (manifest v1) hold transposed matrices: loading
    one must fail with a one-line error saying so, not restore wrong-shaped weights."""
    old = tmp_path / "v1"
    shutil.copytree(store_dir, old)
    manifest = json.loads((old / "step3_jax.json").read_text())
    (old / "step3_jax.json").write_text(json.dumps({**manifest, "version": 1}))
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(old), "--prompt-ids", "1,2")
    assert code == 2 and out == ""
    assert "a v1 store" in err and "convert the Hub checkpoint again" in err
    assert len(err.strip().splitlines()) == 1


def test_export_and_generate_take_a_relative_store_path(capsys, monkeypatch, tmp_path,
                                                      store_dir):
    """orbax reads only absolute paths: a relative --checkpoint must still work (it failed with
    "unreadable orbax checkpoint" before ``checkpoint_dir`` made paths absolute)."""
    monkeypatch.chdir(store_dir.parent)
    code, _, err = run_cli(capsys, "export", "--checkpoint", store_dir.name, "--out",
                           str(tmp_path / "hub"))
    assert code == 0, err
    assert (tmp_path / "hub" / "model.safetensors.index.json").is_file()
    code, _, err = run_cli(capsys, "generate", "--checkpoint", store_dir.name, "--prompt-ids",
                           "1,2,3", "--max-new-tokens", "2")
    assert code == 0, err


def test_export_refuses_a_hub_directory(capsys, tmp_path, hub_dir):
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(hub_dir), "--out",
                           str(tmp_path / "x"))
    assert code == 2 and "not a step3-jax orbax checkpoint" in err


def test_cli_generates_from_every_format_and_placement(capsys, store_dir, hub_dir, fp8_hub):
    """generate --checkpoint takes a Hub dir, an orbax dir (auto-detected) and a block-FP8 Hub
    dir; the orbax one restores straight onto --mesh and onto the AFD groups. Same weights and
    float32 transfer: the same greedy tokens everywhere (FP8: its own dequantized weights)."""
    base = ["generate", "--prompt-ids", "1,2,3", "--prompt-ids", "7,8", "--max-new-tokens", "5",
            "--json", "-q"]

    def tokens(*extra):
        code, out, err = run_cli(capsys, *base, *extra)
        assert code == 0, err
        return [r["generated_ids"] for r in json.loads(out)["results"]]

    want = tokens("--checkpoint", str(hub_dir))
    assert tokens("--checkpoint", str(store_dir)) == want
    assert tokens("--checkpoint", str(store_dir), "--mesh", "dp=2,ep=2") == want
    assert tokens("--checkpoint", str(store_dir), "--afd", "2:2",
                  "--afd-transfer-dtype", "float32") == want
    fp8_dir, dequant_dir = fp8_hub
    assert tokens("--checkpoint", str(fp8_dir)) == tokens("--checkpoint", str(dequant_dir))
