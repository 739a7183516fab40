"""Config parsing from Hub dicts and presets; parameter counts from the weight declaration."""

import json
import re

import jax
import numpy as np
import pytest

from step3_jax.errors import ConfigError
from step3_jax.model.config import from_hub_dict, load_config, presets_dir
from step3_jax.model.weights import Mlp, Moe, count_params, declare


def test_step3_parameter_counts_match_the_model_card():
    counts = count_params(load_config("step3"))
    # Spec §1: 316.3B total, 37.9B activated per token without the input embedding.
    assert round(counts["total"] / 1e9, 1) == 316.3
    assert round(counts["activated"] / 1e9, 1) == 37.9


def test_bench_preset_is_about_one_billion_with_step3_ratios():
    cfg = load_config("bench")
    assert 0.8e9 < count_params(cfg)["total"] < 1.2e9
    assert cfg.num_attention_groups == 1 and cfg.moe_num_experts == 48 and cfg.moe_top_k == 3
    assert not cfg.is_moe(0) and not cfg.is_moe(cfg.num_hidden_layers - 1)


def test_step3_dense_layers_are_0_to_3_and_the_last():
    """Pitfall 3: the last layer (60) is dense too."""
    cfg = load_config("step3")
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe(i)]
    assert dense == [0, 1, 2, 3, 60]
    kinds = [type(layer.ffn) for layer in declare(cfg).layers]
    assert kinds == [Mlp] * 4 + [Moe] * 56 + [Mlp]


def test_hub_quirks_string_enum_singular_max_position_and_wrapper(tiny_raw):
    """Pitfall 4: moe_layers_enum is a string (a list works too); max_position_embedding singular."""
    as_list = dict(tiny_raw, moe_layers_enum=[2, 1])
    wrapped = {"model_type": "step3_vl", "text_config": tiny_raw, "vision_config": {}}
    a, b, c = from_hub_dict(tiny_raw), from_hub_dict(as_list), from_hub_dict(wrapped)
    assert a.moe_layers == b.moe_layers == c.moe_layers == (1, 2)
    assert a.max_position_embedding == 512
    rope_params = {k: v for k, v in tiny_raw.items() if k != "rope_theta"}
    rope_params["rope_parameters"] = {"rope_theta": 1234.0}
    assert from_hub_dict(rope_params).rope_theta == 1234.0


def test_config_is_hashable_and_static_for_jit(tiny_cfg):
    assert hash(tiny_cfg) == hash(tiny_cfg.replace())
    f = jax.jit(lambda x, cfg: x * cfg.hidden_size, static_argnums=1)
    assert int(f(1, tiny_cfg)) == 64


def test_vocab_padding(tiny_cfg):
    assert tiny_cfg.vocab_size == 250 and tiny_cfg.padded_vocab == 256
    assert load_config("step3").padded_vocab == 128896


@pytest.mark.parametrize("text, message", [
    ("{not json", "invalid JSON"),
    (json.dumps({"hidden_size": 8}), "missing required key(s)"),
    (json.dumps([1, 2]), "expected a JSON object"),
])
def test_broken_config_json_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unsupported_or_inconsistent_values_are_named(tiny_raw):
    with pytest.raises(ConfigError, match="num_attention_groups=2"):
        from_hub_dict(dict(tiny_raw, num_attention_groups=2))
    with pytest.raises(ConfigError, match="moe_layers_enum names a layer"):
        from_hub_dict(dict(tiny_raw, moe_layers_enum="1,7"))
    with pytest.raises(ConfigError, match="moe_layers_enum must be"):
        from_hub_dict(dict(tiny_raw, moe_layers_enum="1,x"))
    with pytest.raises(ConfigError, match="hidden_size must be a number"):
        from_hub_dict(dict(tiny_raw, hidden_size="big"))


def test_missing_moe_layers_enum_is_named_not_guessed(tiny_raw):
    """Issue 17 item 14. StepFun's model code would make every layer after the first MoE when
    the key is missing, its config class Step-3's 4..59 whatever the depth: no default to apply,
    so the field is named. Without experts a missing key means a dense model."""
    step3 = json.loads((presets_dir() / "step3.json").read_text())
    for raw, example in ((tiny_raw, '"1,2,3"'), (step3, '"1,2,...,60"')):
        bare = {k: v for k, v in raw.items() if k != "moe_layers_enum"}
        with pytest.raises(ConfigError) as e:
            from_hub_dict(bare, where="ckpt/config.json")
        assert str(e.value) == (f"ckpt/config.json: moe_layers_enum is missing "
                                f"({raw['moe_num_experts']} experts configured but no MoE "
                                f"layers named): add it, e.g. {example} for every layer after "
                                "the first")
    dense = {k: v for k, v in tiny_raw.items() if k not in ("moe_layers_enum", "moe_num_experts")}
    assert from_hub_dict(dense).moe_layers == ()


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="bench, demo, step3, step35-bench, step35-flash, step35-tiny, tiny"):
        load_config("nope")


def test_abstract_params_match_initialized_params(tiny_cfg):
    from step3_jax.model.weights import abstract_params, init_params

    real = init_params(tiny_cfg, seed=3)
    abstract = abstract_params(tiny_cfg)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
        assert r.shape == a.shape and r.dtype == a.dtype
    # Seeded: the same seed gives the same weights, another seed others.
    again, other = init_params(tiny_cfg, seed=3), init_params(tiny_cfg, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(real), jax.tree.leaves(again)))
    assert not np.array_equal(real.embed, other.embed)
    # The vocabulary padding rows are zero.
    assert not np.any(np.asarray(real.embed)[tiny_cfg.vocab_size:])
