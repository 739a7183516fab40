"""Step-3.5 checkpoints (``shared/spec/step35.md`` §3): Hub loading (sharded, MTP layers and the
``step3p7`` wrapper skipped with a notice, block FP8 dequantized), the one-line header errors
through the CLI, ``convert`` -> ``export`` byte for byte, :func:`convert.save_hub`, and placement.

The Hub tensors come from the independent reference (``tests/reference_step35.py``), so the
names and shapes checked here are the spec's, not the declaration's. Weights are compared
exactly (float32 loading widens bf16 exactly; the same numbers in, the same numbers out); the
one tolerance, the FP8 bound, is derived where it is asserted. No forward pass is compiled.
"""

import json
import logging

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from step3_jax.checkpoint import store
from step3_jax.checkpoint.convert import convert, save_hub
from step3_jax.checkpoint.hub import HubReader
from step3_jax.checkpoint.loader import load, model_config
from step3_jax.errors import CheckpointError, ConfigError, Step3Error
from step3_jax.model import quant
from step3_jax.model.config import presets_dir
from step3_jax.model.sharding import param_shardings, parse_mesh
from step3_jax.model.step35_reader import from_step35_dict
from step3_jax.model.step35_weights import (count_params, declare, from_hub_state, init_params,
                                            is_spec)

import reference_step35 as ref
from conftest import run_cli, write_hub_checkpoint

RAW = json.loads((presets_dir() / "step35-tiny.json").read_text())
CFG = from_step35_dict(RAW, name="step35-tiny")
MTP = CFG.num_hidden_layers  # the tiny preset's one MTP layer (num_nextn_predict_layers 1)
# The Linears that may be block-FP8 (spec §3: routed experts, dense and shared MLPs, attention
# projections including the head gate); norms, router, router bias, embedding, LM head never.
FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj",
               "down_proj")


@pytest.fixture(scope="module")
def state():
    return ref.random_hub_state(RAW, seed=0)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, state):
    return write_hub_checkpoint(tmp_path_factory.mktemp("hub35"), RAW, state, shards=2)


def _equal(a, b):
    """Same pytree structure, and every leaf the same dtype and the same values."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_hub_load_equals_the_mapped_state_and_saved_params_load_back(tmp_path, hub, state):
    params, cfg = load(hub, progress=False)
    assert type(params).__name__ == "Params35" and cfg.layer_types == CFG.layer_types
    _equal(params, from_hub_state(state, cfg))
    # bf16 compute: the router bias stays float32 (spec pitfall 8)
    half, _ = load(hub, dtype="bfloat16", progress=False)
    assert half.embed.dtype == ml_dtypes.bfloat16
    assert half.layers[1].ffn.router_bias.dtype == np.float32
    # save_hub: init params -> Hub directory (Hub-spelled config) -> the same params
    made = init_params(CFG, seed=3)
    save_hub(made, CFG, tmp_path / "saved")
    back, back_cfg = load(tmp_path / "saved", progress=False)
    _equal(back, made)
    assert back_cfg.replace(name=CFG.name) == CFG
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "step3p5"
    random, _ = load(config="step35-tiny", seed=3, progress=False)
    _equal(random, made)
    store.save(made, CFG, tmp_path / "store", progress=False)  # the orbax store, float32
    _equal(load(tmp_path / "store", progress=False)[0], made)
    manifest = tmp_path / "store" / store.MANIFEST  # an fp8 store the Step-3.5 layers cannot run
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), weights="fp8")))
    with pytest.raises(CheckpointError, match="fp8 storage is not available for Step-3.5"):
        load(tmp_path / "store", progress=False)


def _mtp_tensors(state) -> dict:
    """Layer ``MTP`` as the Hub stores it (spec §3): a sliding dense-FFN layer plus ``enorm``,
    ``hnorm``, ``eh_proj`` and the shared head."""
    H = CFG.hidden_size
    out = {k.replace("model.layers.1.", f"model.layers.{MTP}."): v for k, v in state.items()
           if k.startswith("model.layers.1.") and ("self_attn." in k or "layernorm" in k)}
    for k in ("gate_proj", "up_proj", "down_proj"):
        out[f"model.layers.{MTP}.mlp.{k}.weight"] = state[f"model.layers.0.mlp.{k}.weight"]
    p = f"model.layers.{MTP}."
    out.update({p + "enorm.weight": np.zeros(H, np.float32),
                p + "hnorm.weight": np.zeros(H, np.float32),
                p + "eh_proj.weight": np.zeros((H, 2 * H), np.float32),
                p + "transformer.shared_head.norm.weight": np.zeros(H, np.float32),
                p + "transformer.shared_head.output.weight": np.zeros((CFG.vocab_size, H),
                                                                      np.float32)})
    return out


def test_mtp_layers_and_the_step3p7_wrapper_are_skipped_with_one_notice(
        tmp_path, state, caplog, monkeypatch):
    mtp = _mtp_tensors(state)
    want = from_hub_state(state, CFG)
    monkeypatch.setattr(logging.getLogger("step3_jax"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="step3_jax"):
        params, _ = load(write_hub_checkpoint(tmp_path / "mtp", RAW, {**state, **mtp}),
                         progress=False)
    _equal(params, want)
    notices = [r.getMessage() for r in caplog.records if "multi-token" in r.getMessage()]
    assert len(notices) == 1 and f"skipping {len(mtp)} tensors" in notices[0], notices
    assert "MTP is not used" in notices[0]

    # step3p7: the text config under text_config, text tensors under model.language_model.
    # (lm_head at the top), vision tensors beside them
    wrapped = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in {**state, **mtp}.items()}
    wrapped.update({"vision_model.embeddings.patch_embedding.weight": np.zeros((4, 3), np.float32),
                    "model.vision_model.post_layernorm.weight": np.zeros(4, np.float32),
                    "vit_large_projector.weight": np.zeros((2, 2), np.float32)})
    config = {"model_type": "step3p7", "text_config": RAW, "vision_config": {"hidden_size": 4}}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="step3_jax"):
        params, cfg = load(write_hub_checkpoint(tmp_path / "p7", config, wrapped, shards=2),
                           progress=False)
    _equal(params, want)
    assert cfg.replace(name=CFG.name) == CFG
    assert "skipping 3 vision-encoder tensors" in caplog.text
    assert caplog.text.count("multi-token") == 1


def _block_fp8(w: np.ndarray):
    """Reference block quantization (spec §3 / model.md §3), written with explicit loops:
    per 128x128 block of each ``[out, in]`` matrix (ragged edges), scale = absmax / 448,
    values = e4m3(w / scale)."""
    lead, (rows, cols) = w.shape[:-2], w.shape[-2:]
    grid = lead + (-(-rows // 128), -(-cols // 128))
    values, scales = np.zeros(w.shape, ml_dtypes.float8_e4m3fn), np.ones(grid, np.float32)
    for idx in np.ndindex(*lead):
        for br in range(grid[-2]):
            for bc in range(grid[-1]):
                block = idx + (slice(br * 128, (br + 1) * 128), slice(bc * 128, (bc + 1) * 128))
                amax = np.abs(w[block]).max()
                scales[idx + (br, bc)] = amax / 448.0 if amax > 0 else 1.0
                values[block] = (w[block] / scales[idx + (br, bc)]).astype(values.dtype)
    expanded = np.ones(w.shape, np.float32)
    for idx in np.ndindex(*lead):
        for br in range(grid[-2]):
            for bc in range(grid[-1]):
                expanded[idx + (slice(br * 128, (br + 1) * 128),
                                slice(bc * 128, (bc + 1) * 128))] = scales[idx + (br, bc)]
    return values, scales, expanded


def _fp8_state(state):
    """The FP8 checkpoint of ``state``: the Linears of FP8_LINEARS block-FP8 with their
    ``weight_scale_inv``, the rest bf16 (router bias float32); with each FP8 tensor's expanded
    per-element scale."""
    fp8, scale_of = {}, {}
    for name, w in state.items():
        if name.split(".")[-2] in FP8_LINEARS:
            fp8[name], fp8[name + "_scale_inv"], scale_of[name] = _block_fp8(w.astype(np.float32))
        elif name.endswith("router_bias"):
            fp8[name] = w
        else:
            fp8[name] = w.astype(ml_dtypes.bfloat16)
    return fp8, scale_of


def test_fp8_weights_dequantize_within_the_block_bound(tmp_path, state):
    for spec in jax.tree.leaves(declare(CFG), is_leaf=is_spec):  # which weights may be FP8
        assert quant.is_quantized(spec) == (spec.hub.split(".")[-2] in FP8_LINEARS), spec.hub
    fp8, scale_of = _fp8_state(state)
    raw = dict(RAW, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    hub = write_hub_checkpoint(tmp_path / "hub", raw, fp8, shards=2)
    params, cfg = load(hub, progress=False)
    convert(hub, tmp_path / "st", weights="float32", progress=False)  # dequantized once, stored
    _equal(load(tmp_path / "st", progress=False)[0], params)
    assert "quantization_config" not in json.loads((tmp_path / "st" / "config.json").read_text())
    got = {s.hub: np.asarray(v) for s, v in zip(jax.tree.leaves(declare(cfg), is_leaf=is_spec),
                                                  jax.tree.leaves(params))}
    for name, scale in scale_of.items():
        w = state[name].astype(np.float32)
        have = got[name].reshape(w.shape)
        # exactly the reference dequantization: one float32 product per element, as loading does
        np.testing.assert_array_equal(have, fp8[name].astype(np.float32) * scale, err_msg=name)
        # and within the quantization bound of the original weight: e4m3 keeps 3 mantissa bits,
        # so rounding w / scale (|.| <= 448) to nearest errs by at most 2^-4 of it in the normal
        # range (>= 2^-6) and by half the subnormal step 2^-9 below it; times the scale that is
        # max(2^-4 |w|, 2^-10 scale), plus float32 rounding of the division (2^-24 relative)
        bound = np.maximum(2.0 ** -4 * np.abs(w), 2.0 ** -10 * scale) * (1 + 2.0 ** -20)
        assert np.all(np.abs(have - w) <= bound), name
    assert got["model.layers.1.moe.router_bias"].dtype == np.float32
    np.testing.assert_array_equal(got["model.layers.1.moe.router_bias"],
                                  state["model.layers.1.moe.router_bias"])


def _convert_fails(capsys, hub, out, *fragments, argv=()):
    code, _, err = run_cli(capsys, "convert", "--hf", str(hub), "--out", str(out), *argv)
    lines = [line for line in err.splitlines() if line.startswith("step3-jax: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_bad_checkpoints_are_one_line_errors_through_the_cli(capsys, tmp_path, state, hub):
    out = tmp_path / "out"
    gone = "model.layers.3.moe.down_proj.weight"
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "a", RAW, {
        k: v for k, v in state.items() if k != gone}), out, f"missing tensor {gone}")
    bad = "model.layers.1.self_attn.g_proj.weight"  # [6 sliding heads, 64]
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "b", RAW, {
        **state, bad: np.zeros((4, 64), np.float32)}), out, bad, "expected shape [6, 64]",
        "got [4, 64]")
    extra = "model.layers.2.self_attn.sinks"
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "c", RAW, {
        **state, extra: np.zeros(6, np.float32)}), out, f"unknown tensor {extra}")
    beyond = f"model.layers.{MTP + 1}.enorm.weight"  # past the one MTP layer: not skipped
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "d", RAW, {
        **state, beyond: np.zeros(64, np.float32)}), out, f"unknown tensor {beyond}")
    fp8, _ = _fp8_state(state)
    grid = "model.layers.3.moe.up_proj.weight_scale_inv"  # [8 experts, 1, 1] is right
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "e", RAW, {
        **fp8, grid: np.ones((8, 2, 1), np.float32)}), out, grid, "block grid [8, 2, 1]",
        "expected [8, 1, 1]")
    router = "model.layers.3.moe.gate.weight"
    _convert_fails(capsys, write_hub_checkpoint(tmp_path / "f", RAW, {
        **state, router: state[router].astype(ml_dtypes.float8_e4m3fn),
        router + "_scale_inv": np.ones((1, 1), np.float32)}), out, router, "never block-FP8")
    _convert_fails(capsys, hub, out, "fp8 storage is not available for Step-3.5",
                   argv=("--dtype", "fp8"))
    with pytest.raises(ConfigError, match="is a Step-3 model, the checkpoint .* a Step-3.5 one"):
        model_config(hub, "tiny")


def test_convert_then_export_is_byte_identical_and_loads_equal(capsys, tmp_path):
    state = ref.random_hub_state(RAW, seed=1, dtype=ml_dtypes.bfloat16)  # router bias float32
    hub = write_hub_checkpoint(tmp_path / "hub", RAW, state, shards=3)
    (hub / "tokenizer.json").write_text("{}")
    code, out, err = run_cli(capsys, "convert", "--hf", str(hub), "--out", str(tmp_path / "st"),
                             "--json", "--quiet")
    assert code == 0 and json.loads(out)["weights"] == "bfloat16", err
    code, out, err = run_cli(capsys, "export", "--checkpoint", str(tmp_path / "st"), "--out",
                             str(tmp_path / "back"), "--json", "--quiet")
    assert code == 0 and json.loads(out)["tensors"] == len(state), err
    back = tmp_path / "back"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(back / file)))
    assert set(tensors) == set(state) and (back / "tokenizer.json").is_file()
    for name, value in state.items():
        assert tensors[name].dtype == value.dtype, name
        assert tensors[name].tobytes() == value.tobytes(), name
    assert HubReader(back).dtype("model.layers.4.moe.router_bias") == "F32"
    assert from_step35_dict(json.loads((back / "config.json").read_text())).replace(
        name=CFG.name) == CFG
    stored, _ = load(tmp_path / "st", progress=False)
    _equal(stored, load(hub, progress=False)[0])

    code, out, err = run_cli(capsys, "info", "--checkpoint", str(tmp_path / "st"), "--json")
    assert code == 0, err
    assert json.loads(out)["parameters"] == count_params(CFG)["total"]


def test_mesh_placement_follows_the_rules_table(tmp_path, hub):
    """Hub, store and random weights placed by ``sharding.param_shardings`` on tp=2, ep=2, the
    same values as on one device; a mesh that does not divide the K/V heads is one line."""
    with pytest.raises(Step3Error, match="tp=4 does not divide the 2 K/V heads") as e:
        load(hub, mesh=parse_mesh("tp=4"), progress=False)
    assert "\n" not in str(e.value)
    mesh = parse_mesh("tp=2,ep=2")
    store.save(load(hub, progress=False)[0], CFG, tmp_path / "st", progress=False)
    for source in ({"checkpoint": hub}, {"checkpoint": tmp_path / "st"},
                   {"config": "step35-tiny", "seed": 1}):
        params, cfg = load(**source, mesh=mesh, progress=False)
        shardings = jax.tree.leaves(param_shardings(cfg, mesh))
        assert len(shardings) == len(jax.tree.leaves(params))
        for leaf, want in zip(jax.tree.leaves(params), shardings):
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), source
        _equal(params, load(**source, progress=False)[0])
