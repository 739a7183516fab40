"""Hub checkpoint loading: layouts, dtypes, and every malformed input named in one line."""

import json
import logging

import ml_dtypes
import numpy as np
import pytest

from step3_jax.checkpoint.hub import load_hub, to_hub
from step3_jax.checkpoint.loader import load
from step3_jax.errors import CheckpointError
from step3_jax.model.weights import stack_experts, unstack_experts

from conftest import write_hub_checkpoint


def _leaves_equal(a, b):
    import jax

    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_single_file_sharded_and_wrapper_layouts_agree(tmp_path, tiny_raw, hub_state, tiny_params,
                                                       tiny_cfg):
    single = write_hub_checkpoint(tmp_path / "single", tiny_raw, hub_state)
    wrapped = write_hub_checkpoint(tmp_path / "wrapped", tiny_raw, hub_state, shards=2,
                                   wrapper=True)
    p1, cfg1 = load(single, progress=False)
    p2, cfg2 = load(wrapped, progress=False)
    assert cfg1.moe_layers == cfg2.moe_layers == tiny_cfg.moe_layers
    assert _leaves_equal(stack_experts(p1), tiny_params)
    assert _leaves_equal(stack_experts(p2), tiny_params)


def test_load_returns_the_kernel_layout(hub_dir, tiny_params):
    """XLA:CPU's loop kernel gets per-expert arrays; ragged_dot keeps the stacked experts."""
    loop, _ = load(hub_dir, progress=False, moe_impl="loop")
    ragged, _ = load(hub_dir, progress=False, moe_impl="ragged")
    assert isinstance(loop.layers[1].ffn.gate, tuple) and len(loop.layers[1].ffn.gate) == 8
    assert loop.layers[1].ffn.gate[3].shape == (32, 64)  # [Fe, H]
    assert ragged.layers[1].ffn.gate.shape == (8, 32, 64)
    assert _leaves_equal(unstack_experts(tiny_params), loop)


@pytest.mark.parametrize("layout", [lambda p: p, unstack_experts])
def test_to_hub_inverts_loading_bit_exactly(tiny_params, tiny_cfg, hub_state, layout):
    back = to_hub(layout(tiny_params), tiny_cfg)
    assert set(back) == set(hub_state)
    for name, value in hub_state.items():
        assert back[name].shape == value.shape and np.array_equal(back[name], value), name


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_half_precision_checkpoints_load_exactly(tmp_path, tiny_raw, hub_state, tiny_cfg, dtype):
    state = {k: v.astype(dtype) for k, v in hub_state.items()}
    params = load_hub(write_hub_checkpoint(tmp_path, tiny_raw, state), tiny_cfg, progress=False)
    back = to_hub(params, tiny_cfg)
    for name, value in state.items():  # widening to float32 is exact
        assert np.array_equal(back[name], value.astype(np.float32)), name


def test_loading_into_bfloat16(hub_dir):
    params, cfg = load(hub_dir, dtype="bfloat16", progress=False)
    assert cfg.dtype == "bfloat16" and params.embed.dtype == ml_dtypes.bfloat16


def test_vision_tensors_are_skipped_with_a_notice(tmp_path, tiny_raw, hub_state, tiny_params,
                                                  tiny_cfg, caplog, monkeypatch):
    state = dict(hub_state)
    state["vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3), np.float32)
    state["vit_large_projector.weight"] = np.zeros((2, 2), np.float32)
    directory = write_hub_checkpoint(tmp_path, tiny_raw, state, wrapper=True)
    monkeypatch.setattr(logging.getLogger("step3_jax"), "propagate", True)  # cli.main unsets it
    with caplog.at_level(logging.INFO, logger="step3_jax"):
        params = load_hub(directory, tiny_cfg, progress=False)
    assert "skipping 2 vision-encoder tensors" in caplog.text
    assert _leaves_equal(params, tiny_params)


def _transformers_names(state: dict) -> dict:
    """``state`` as transformers' save_pretrained writes it from StepFun's model code: text
    tensors under ``model.language_model.``, ``lm_head.weight`` unchanged."""
    return {"model.language_model." + k[len("model."):] if k.startswith("model.") else k: v
            for k, v in state.items()}


def test_transformers_save_pretrained_layout_loads(tmp_path, tiny_raw, hub_state, tiny_params,
                                                   caplog, monkeypatch):
    """Issue 17 item 13: a checkpoint in transformers' layout was refused as "unknown tensor
    model.language_model.embed_tokens.weight (and 89 more)". It now loads to the same weights,
    its vision tensors (model.vision_model.*, model.vit_*) skipped with the notice."""
    state = _transformers_names(hub_state)
    state["model.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3), np.float32)
    state["model.vit_downsampler.weight"] = np.zeros((2, 2), np.float32)
    state["model.vit_large_projector.weight"] = np.zeros((2, 2), np.float32)
    directory = write_hub_checkpoint(tmp_path, tiny_raw, state, shards=2, wrapper=True)
    monkeypatch.setattr(logging.getLogger("step3_jax"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="step3_jax"):
        params, _ = load(directory, progress=False, moe_impl="ragged")
    assert _leaves_equal(params, tiny_params)
    assert "skipping 3 vision-encoder tensors" in caplog.text
    assert "reading the 54 model.language_model.* tensors as model.*" in caplog.text


def test_transformers_layout_errors_name_its_tensors(tmp_path, tiny_raw, hub_state, tiny_cfg):
    """Header checks work in the transformers layout too, naming tensors as its files do."""
    state = _transformers_names(hub_state)
    missing = {k: v for k, v in state.items()
               if k != "model.language_model.layers.2.moe.up_proj.weight"}
    _expect(write_hub_checkpoint(tmp_path / "a", tiny_raw, missing), tiny_cfg,
            "missing tensor model.language_model.layers.2.moe.up_proj.weight")
    shaped = dict(state, **{"model.language_model.layers.3.mlp.down_proj.weight":
                            np.zeros((96, 64), np.float32)})
    _expect(write_hub_checkpoint(tmp_path / "b", tiny_raw, shaped), tiny_cfg,
            "model.language_model.layers.3.mlp.down_proj.weight: expected shape [64, 96]")
    both = dict(state, **{"model.norm.weight": hub_state["model.norm.weight"]})
    _expect(write_hub_checkpoint(tmp_path / "c", tiny_raw, both), tiny_cfg,
            "tensor model.norm.weight is stored twice, as model.norm.weight and as "
            "model.language_model.norm.weight")


def _expect(directory, cfg, *fragments):
    with pytest.raises(CheckpointError) as e:
        load_hub(directory, cfg, progress=False)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_unknown_and_misshapen_tensors_are_named(tmp_path, tiny_raw, hub_state, tiny_cfg):
    missing = dict(hub_state)
    del missing["model.layers.2.moe.up_proj.weight"]
    _expect(write_hub_checkpoint(tmp_path / "a", tiny_raw, missing), tiny_cfg,
            "missing tensor model.layers.2.moe.up_proj.weight")

    unknown = dict(hub_state, **{"model.layers.1.self_attn.q_norm.weight": np.ones(4, np.float32)})
    _expect(write_hub_checkpoint(tmp_path / "b", tiny_raw, unknown), tiny_cfg,
            "unknown tensor model.layers.1.self_attn.q_norm.weight")

    shaped = dict(hub_state)
    shaped["model.layers.3.mlp.down_proj.weight"] = np.zeros((96, 64), np.float32)  # transposed
    _expect(write_hub_checkpoint(tmp_path / "c", tiny_raw, shaped), tiny_cfg,
            "model.layers.3.mlp.down_proj.weight", "expected shape [64, 96]", "got [96, 64]")

    ints = dict(hub_state, **{"model.norm.weight": np.ones(64, np.int32)})
    _expect(write_hub_checkpoint(tmp_path / "d", tiny_raw, ints), tiny_cfg,
            "model.norm.weight", "unsupported dtype I32")


def test_broken_index_and_corrupt_shards_are_named(tmp_path, tiny_raw, hub_state, tiny_cfg):
    directory = write_hub_checkpoint(tmp_path / "a", tiny_raw, hub_state, shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(directory, tiny_cfg, "model-00009-of-00009.safetensors", "listed in", "missing")

    directory = write_hub_checkpoint(tmp_path / "b", tiny_raw, hub_state, shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(directory, tiny_cfg, "model.extra.weight", "absent from that file")

    directory = write_hub_checkpoint(tmp_path / "c", tiny_raw, hub_state, shards=2)
    shard = directory / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    _expect(directory, tiny_cfg, "model-00002-of-00002.safetensors")

    empty = tmp_path / "d"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(tiny_raw))
    _expect(empty, tiny_cfg, "no model.safetensors or model.safetensors.index.json")


def test_overrides_that_change_the_checkpoints_architecture_are_named(monkeypatch, hub_dir):
    """A config or override beside a checkpoint must describe it (issue 17 item 5): refused in one
    line naming the field, before any tensor is read; numerics (dtype, MoE kernel) are free."""
    from step3_jax.checkpoint import hub
    from step3_jax.checkpoint.loader import model_config
    from step3_jax.errors import ConfigError

    monkeypatch.setattr(hub, "read_leaves", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ConfigError, match=r"^overrides moe_intermediate_size=16 does not match "
                                          r"the checkpoint .*: moe_intermediate_size 16 "
                                          r"\(checkpoint: 32\);"):
        load(hub_dir, moe_intermediate_size=16)
    with pytest.raises(ConfigError,
                       match=r"^config 'tiny' .*: vocab_size 300 \(checkpoint: 250\);"):
        load(hub_dir, config="tiny", vocab_size=300)
    cfg = model_config(hub_dir, "tiny", dtype="bfloat16", moe_impl="loop")
    assert (cfg.dtype, cfg.moe_impl, cfg.hidden_size) == ("bfloat16", "loop", 64)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")



def test_sharded_loading_into_the_per_expert_layout(hub_dir, tiny_params):
    """Placement comes from the rules table; expert slices keep the rest of their spec."""
    import jax

    from step3_jax.model.sharding import make_mesh

    mesh = make_mesh(tp=2)
    params, cfg = load(hub_dir, progress=False, moe_impl="loop",
                       mesh=mesh)
    assert _leaves_equal(stack_experts(params), tiny_params)
    gate = params.layers[1].ffn.gate[0]
    assert gate.sharding.spec == jax.sharding.PartitionSpec("tp", None)  # expert_mlp over tp
    assert len(gate.sharding.device_set) == 2
