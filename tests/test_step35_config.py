"""The Step-3.5/3.7-Flash configuration (``shared/spec/step35.md`` §1) and the paper's analysis
applied to it (``step3-jax info`` / ``cost`` with a Step-3.5 config).

Expected figures are computed here by hand from the spec's numbers, not read back from the code.
"""

import json
import re

import pytest

from step3_jax.analysis import step35
from step3_jax.analysis.paper_tables import HARDWARE, MODEL_NAMES
from step3_jax.errors import ConfigError
from step3_jax.model.config import from_hub_dict, load_config, presets_dir
from step3_jax.model.step35_config import FULL, SLIDING, RopeScaling, Step35Config
from step3_jax.model.step35_reader import from_any_dict, from_step35_dict, load_any_config

from conftest import run_cli

FLASH_ROW = "Step-3.5 (step35-flash)"


def _raw(name: str) -> dict:
    return json.loads((presets_dir() / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def flash_raw() -> dict:
    return _raw("step35-flash")


@pytest.fixture(scope="module")
def flash(flash_raw) -> Step35Config:
    return from_step35_dict(flash_raw, name="step35-flash")


def _transformers_spelling(hub: dict) -> dict:
    """``hub`` as transformers' ``Step3p7TextConfig`` saves it: renamed keys, RoPE per layer
    type under ``rope_parameters`` (the llama3 scaling merged into ``full_attention``), the MoE
    layers as ``mlp_layer_types``, no StepFun-only keys."""
    kinds = hub["layer_types"]
    rope = {}
    for kind in (FULL, SLIDING):
        i = kinds.index(kind)
        rope[kind] = {"rope_type": "default", "rope_theta": hub["rope_theta"][i],
                      "partial_rotary_factor": hub["partial_rotary_factors"][i]}
    rope[FULL].update(hub["rope_scaling"])
    moe = {int(i) for i in hub["moe_layers_enum"].split(",")}
    heads = {FULL: hub["num_attention_heads"],
             SLIDING: hub["attention_other_setting"]["num_attention_heads"]}
    return {
        "model_type": "step3p5", "hidden_size": hub["hidden_size"],
        "num_hidden_layers": hub["num_hidden_layers"], "head_dim": hub["head_dim"],
        "vocab_size": hub["vocab_size"], "num_attention_heads": hub["num_attention_heads"],
        "num_key_value_heads": hub["num_attention_groups"],
        "num_sliding_attention_heads": heads[SLIDING],
        "num_attention_heads_per_layer": [heads[k] for k in kinds],
        "layer_types": kinds, "sliding_window": hub["sliding_window"], "rope_parameters": rope,
        "mlp_layer_types": ["sparse" if i in moe else "dense" for i in range(len(kinds))],
        "n_routed_experts": hub["moe_num_experts"], "num_experts_per_tok": hub["moe_top_k"],
        "moe_intermediate_size": hub["moe_intermediate_size"],
        "share_expert_dim": hub["share_expert_dim"], "intermediate_size": hub["intermediate_size"],
        "moe_router_scaling_factor": hub["moe_router_scaling_factor"],
        "swiglu_limits": [v or None for v in hub["swiglu_limits"]],
        "swiglu_limits_shared": [v or None for v in hub["swiglu_limits_shared"]],
        "num_nextn_predict_layers": hub["num_nextn_predict_layers"],
        "max_position_embeddings": hub["max_position_embeddings"],
        "rms_norm_eps": hub["rms_norm_eps"], "tie_word_embeddings": False,
        "bos_token_id": hub["bos_token_id"], "eos_token_id": hub["eos_token_id"],
    }


def _pad(hub: dict, extra: int) -> dict:
    """Every per-layer list padded with ``extra`` MTP entries, as the Hub file pads 45 to 48."""
    out = dict(hub, num_nextn_predict_layers=extra)
    for key in ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits",
                "swiglu_limits_shared"):
        out[key] = hub[key] + [hub[key][-3]] * extra  # MTP layers are sliding (i % 4 != 0)
    return out


# ----- reading --------------------------------------------------------------------------------------

def test_hub_spelling_transformers_spelling_wrapper_and_padding_agree(flash_raw, flash):
    hf = from_step35_dict(_transformers_spelling(flash_raw), name="step35-flash")
    wrapped = from_any_dict({"model_type": "step3p7", "text_config": flash_raw,
                             "vision_config": {"width": 1536}}, name="step35-flash")
    padded = from_step35_dict(_pad(flash_raw, 3), name="step35-flash")
    assert hf == flash and wrapped == flash and padded == flash
    # share_expert_dims (the remote config's plural) is the same key.
    plural = {k: v for k, v in flash_raw.items() if k != "share_expert_dim"}
    assert from_step35_dict(dict(plural, share_expert_dims=1280)).share_expert_dim == 1280


def test_round_trip_through_to_hub_dict():
    for name in ("step35-tiny", "step35-bench", "step35-flash"):
        cfg = load_any_config(name)
        assert from_step35_dict(cfg.to_hub_dict(), name=name) == cfg


def test_flash_per_layer_data(flash):
    """Spec §1-§2: full attention at i % 4 == 0 with 64 heads, theta 5e6, half-width llama3-scaled
    RoPE; sliding elsewhere with 96 heads, theta 1e4, full-width unscaled RoPE, window 512; 8 K/V
    heads of 128 everywhere; MoE on 3..44; clamps 7 on 43-44 and 16 (shared) on 44."""
    assert flash.num_hidden_layers == 45 and flash.num_nextn_predict_layers == 3
    full = [s.index for s in flash.layers if s.attention == FULL]
    assert full == list(range(0, 45, 4)) and len(full) == 12
    llama3 = RopeScaling(2.0, 1.0, 32.0, 131072)
    for s in flash.layers:
        is_full = s.index % 4 == 0
        assert (s.q_heads, s.kv_heads, s.head_dim) == (64 if is_full else 96, 8, 128)
        assert s.window == (None if is_full else 512)
        assert s.rope_theta == (5e6 if is_full else 1e4)
        assert s.rotary_dim == (64 if is_full else 128)
        assert s.rope_scaling == (llama3 if is_full else None)
        assert s.moe == (s.index >= 3)
        assert s.swiglu_limit == (7.0 if s.index in (43, 44) else 0.0)
        assert s.swiglu_limit_shared == (16.0 if s.index == 44 else 0.0)
    assert (flash.moe_num_experts, flash.moe_top_k, flash.moe_router_scaling_factor) == \
        (288, 8, 3.0)
    assert flash.eos_token_ids == (1, 2, 128007) and flash.padded_vocab == flash.vocab_size


def test_tiny_mixes_kinds_with_a_small_window_and_drops_its_mtp_entry():
    cfg = load_any_config("step35-tiny")
    assert cfg.layer_types == (FULL, SLIDING, SLIDING, SLIDING, FULL)
    assert 8 <= cfg.sliding_window <= 16 and cfg.num_nextn_predict_layers == 1
    assert len(_raw("step35-tiny")["layer_types"]) == cfg.num_hidden_layers + 1
    assert {s.q_heads for s in cfg.layers if s.attention == SLIDING} != \
        {s.q_heads for s in cfg.layers if s.attention == FULL}
    assert cfg.padded_vocab == 256 > cfg.vocab_size


def test_config_is_hashable_and_static_for_jit(flash):
    import jax

    assert hash(flash) == hash(flash.replace())
    f = jax.jit(lambda x, cfg: x * cfg.layer(1).q_heads, static_argnums=1)
    assert int(f(1, flash)) == 96


def test_kv_positions_at_the_window_edge(flash):
    """A sliding layer keeps min(c, 512) positions (the current one included); a full one c."""
    for c, kept in ((1, 1), (511, 511), (512, 512), (513, 512), (32768, 512)):
        assert flash.kv_positions(1, c) == kept and flash.kv_positions(0, c) == c


# ----- refusals -------------------------------------------------------------------------------------

def _without(raw, *keys):
    return {k: v for k, v in raw.items() if k not in keys}


@pytest.mark.parametrize("change, fragment", [
    (lambda r: _without(r, "layer_types"), "missing required key layer_types"),
    (lambda r: _without(r, "moe_layers_enum"), "missing required key moe_layers_enum"),
    (lambda r: _without(r, "moe_router_scaling_factor"),
     "missing required key moe_router_scaling_factor"),
    (lambda r: _without(r, "sliding_window"), "missing required key sliding_window"),
    (lambda r: _without(r, "num_attention_groups"),
     "missing required key num_attention_groups (or num_key_value_heads)"),
    (lambda r: dict(r, layer_types=r["layer_types"][:44]),
     "layer_types has 44 entries: expected 45 (num_hidden_layers) or 48"),
    (lambda r: dict(r, layer_types="sliding_attention"), "layer_types must be a list"),
    (lambda r: dict(r, layer_types=["chunked_attention"] + r["layer_types"][1:]),
     "layer_types[0]='chunked_attention'"),
    (lambda r: dict(r, sink=True), "sink=True is not supported"),
    (lambda r: dict(r, att_impl_type="MLA"), "att_impl_type='MLA' is not supported"),
    (lambda r: dict(r, use_qk_norm=False), "use_qk_norm=False is not supported"),
    (lambda r: dict(r, moe_router_activation="softmax"), "moe_router_activation='softmax'"),
    (lambda r: dict(r, num_key_value_heads=4),
     "num_attention_groups=8 and num_key_value_heads=4 disagree"),
    (lambda r: dict(r, attention_other_setting={"num_attention_heads": 96,
                                                "num_attention_groups": 4}),
     "attention_other_setting.num_attention_groups=4 differs"),
    (lambda r: dict(r, num_sliding_attention_heads=80),
     "num_sliding_attention_heads=80 and attention_other_setting.num_attention_heads=96"),
    (lambda r: dict(r, num_attention_heads=60), "layer 0: 60 query heads"),
    (lambda r: dict(r, partial_rotary_factors=[0.3] * 45), "partial_rotary_factors[0]=0.3"),
    (lambda r: dict(r, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     "rope_type 'yarn' is not supported"),
    (lambda r: dict(r, hidden_size="big"), "hidden_size must be an integer, got 'big'"),
    (lambda r: dict(r, moe_layers_enum="3,x"), "moe_layers_enum must be"),
    (lambda r: dict(r, moe_layers_enum="3,50"), "moe_layers_enum names a layer outside 0..47"),
    (lambda r: dict(r, mlp_layer_types=["sparse"] * 45),
     "moe_layers_enum and mlp_layer_types name different MoE layers"),
    (lambda r: dict(r, num_attention_heads_per_layer=[64] * 45),
     "num_attention_heads_per_layer disagrees"),
    (lambda r: dict(r, swiglu_limits=[-1.0] * 45), "swiglu_limits[_shared][0] must be >= 0"),
    (lambda r: dict(r, rope_parameters={FULL: {"rope_theta": 1e6}}),
     "rope_parameters.full_attention.rope_theta=1000000.0 disagrees"),
])
def test_a_bad_field_is_a_one_line_error_naming_it(tmp_path, flash_raw, change, fragment):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(change(flash_raw)))
    with pytest.raises(ConfigError) as e:
        load_any_config(path)
    message = str(e.value)
    assert fragment in message and "\n" not in message
    assert str(path) in message or "config '" in message


def test_step3_loader_refuses_step35_by_name_and_reads_step3_unchanged():
    with pytest.raises(ConfigError, match=re.escape(
            "preset step35-tiny: model_type 'step3p5' is a Step-3.5-family model")):
        load_config("step35-tiny")
    with pytest.raises(ConfigError, match="x.json: model_type 'step3p7'"):
        from_hub_dict({"model_type": "step3p7", "text_config": {"hidden_size": 8}},
                      where="x.json")
    assert load_any_config("step3") == load_config("step3")
    assert load_any_config("tiny", dtype="bfloat16") == load_config("tiny", dtype="bfloat16")


# ----- parameters -----------------------------------------------------------------------------------

def test_flash_parameter_counts_against_the_published_totals(flash):
    """The model card says 196B total and ~11B active; NVIDIA's model page 196.81B total. Both
    are rounded, so the test asks for what the rounding allows: total in [196e9, 197e9) (the card
    truncates; 196.81B lies in the same interval) and activated rounding to 11B, i.e. in
    [10.5e9, 11.5e9). The trunk only (the 3 MTP layers would add ~0.8B each with their head),
    activated without the input embedding (with it: 11.99B, which would round to 12B)."""
    counts = step35.param_counts(flash)
    assert 196e9 <= counts["total"] < 197e9
    assert 10.5e9 <= counts["activated"] < 11.5e9
    assert counts["activated"] + counts["by_part"]["embedding"] > 11.5e9
    # By hand from the spec's shapes.
    H, V, d, I, E, Fe = 4096, 128896, 128, 11264, 288, 1280
    attn = {n: 2 * n * d * H + 2 * 8 * d * H + n * H + 2 * d for n in (64, 96)}
    moe = E * 3 * H * Fe + 3 * H * 1280 + E * H + E
    total = 12 * attn[64] + 33 * attn[96] + 3 * 3 * H * I + 42 * moe + 45 * 2 * H + 2 * V * H + H
    assert counts["total"] == total
    assert counts["activated"] == total - V * H - 42 * (E - 8) * 3 * H * Fe


def test_bench_is_near_the_step3_bench_scale():
    from step3_jax.model.weights import count_params

    ours = step35.param_counts(load_any_config("step35-bench"))
    theirs = count_params(load_config("bench"))
    assert 0.7 < ours["total"] / theirs["total"] < 1.3
    # embed, final norm, lm_head; per layer 2 norms + q/k/v/o/g + q/k norms; dense mlp x3;
    # MoE router, router bias, 3 stacked expert tensors, 3 shared-expert tensors.
    shapes = step35.hub_tensor_shapes(load_any_config("step35-bench"))
    assert len(shapes) == 3 + 8 * 9 + 1 * 3 + 7 * 8
    assert shapes["model.layers.1.moe.gate_proj.weight"] == (288, 128, 1024)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (24 * 128, 1024)


# ----- KV bytes and the CLI -------------------------------------------------------------------------

def test_info_json_kv_bytes_by_hand(capsys):
    code, out, _ = run_cli(capsys, "info", "--config", "step35-flash", "--json")
    assert code == 0
    doc = json.loads(out)
    per_position = 2 * 8 * 128  # K and V, 8 heads of 128, every layer
    assert doc["kv_bytes_per_token"]["bfloat16"] == 12 * per_position * 2 == 48 * 1024
    assert doc["kv_window_bytes_per_sequence"]["fp8"] == 33 * 512 * per_position
    assert doc["kv_bytes_per_token_without_window"]["fp8"] == 45 * per_position
    for c in (8192, 32768):
        assert doc["kv_bytes_per_sequence"][str(c)]["bfloat16"] == \
            (12 * c + 33 * 512) * per_position * 2
    # Intensity (8-bit KV): 4 * heads / (2 * KV heads) per kind; the model's mix at 8K.
    ai = doc["arithmetic_intensity"]["8192"]
    assert (ai[FULL], ai[SLIDING]) == (16, 24)
    assert ai["model"] == pytest.approx((12 * 8192 * 64 + 33 * 512 * 96) * 4 /
                                        ((12 * 8192 + 33 * 512) * 16))
    assert doc["moe_sparsity"] == pytest.approx(9 / 289)
    assert doc["parameters"] == step35.param_counts(load_any_config("step35-flash"))["total"]


def test_info_text(capsys):
    code, out, _ = run_cli(capsys, "info", "--config", "step35-flash")
    assert code == 0
    assert "12 full attention, 33 sliding window 512" in out
    assert "49,152 (bf16)" in out and "69,206,016 (bf16) per sequence" in out
    assert "3 MTP layer(s) not counted" in out


@pytest.mark.parametrize("context", [8192, 32768])
def test_cost_row_by_hand(capsys, context):
    code, out, _ = run_cli(capsys, "cost", "--config", "step35-flash", "--context", str(context),
                           "--json")
    assert code == 0
    doc = json.loads(out)
    assert list(doc["models"]) == list(MODEL_NAMES) + [FLASH_ROW]
    m = doc["models"][FLASH_ROW]
    H, d, w = 4096, 128, 512
    positions = 12 * context + 33 * min(context, w)
    assert m["kv_bytes"] == positions * 2 * 8 * d  # 8-bit KV
    assert m["attn_flops"] == (12 * context * 64 + 33 * min(context, w) * 96) * 4 * d
    proj = {n: 2 * n * d * H + 2 * 8 * d * H + n * H for n in (64, 96)}
    assert m["linear_flops"] == 2 * (12 * proj[64] + 33 * proj[96])
    assert m["ffn_flops"] == 2 * (3 * 3 * H * 11264 + 42 * 9 * 3 * H * 1280)
    assert m["moe_sparsity"] == pytest.approx(9 / 289)
    h800 = HARDWARE["H800"]
    assert m["min_sparsity"]["H800"] == pytest.approx(
        H * h800.flops * 45 / (h800.server_net * h800.bandwidth * (0.050 / 3 * 2 / 3)))
    kinds = m["by_attention_kind"]
    assert kinds[SLIDING]["kv_bytes"] == 33 * min(context, w) * 2 * 8 * d
    assert any("sliding layers the last sliding_window positions" in n for n in doc["notes"])
    # The paper's rows are untouched by the extra one.
    plain = json.loads(run_cli(capsys, "cost", "--context", str(context), "--json")[1])
    assert all(doc["models"][n] == plain["models"][n] for n in MODEL_NAMES)


def test_cost_text_and_twice_named(capsys):
    code, out, _ = run_cli(capsys, "cost", "--config", "step35-flash")
    assert code == 0
    assert re.search(r"^Step-3\.5 \(step35-flash\) +2\.36e\+08 +4\.05e\+09", out, re.M)
    assert f"{FLASH_ROW}'s H and L: H800 0.0245" in out
    code, out, err = run_cli(capsys, "cost", "--config", "step35-flash", "--config",
                             "step35-flash")
    assert code == 2 and "named twice" in err and out == ""


def test_estimate_does_not_run_step35_yet_and_says_so_in_one_line(capsys):
    code, out, err = run_cli(capsys, "estimate", "--config", "step35-flash")
    lines = [line for line in err.splitlines() if line.startswith("step3-jax: error:")]
    assert code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err
    assert "model_type 'step3p5' is a Step-3.5-family model" in lines[0]


def test_more_malformed_fields_and_the_one_block_rope_parameters(flash_raw):
    hf = _transformers_spelling(flash_raw)
    for change, fragment in (
            (dict(hf, rope_parameters=[1]), "rope_parameters must map layer types"),
            (dict(flash_raw, attention_other_setting=96), "attention_other_setting must be"),
            (dict(flash_raw, rope_scaling="llama3"), "rope_scaling must be a JSON object"),
            (_without(flash_raw, "max_position_embeddings"),
             "missing required key max_position_embeddings"),
            (dict(flash_raw, moe_num_experts=288.5), "moe_num_experts must be an integer")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            from_step35_dict(change)
    # transformers' single-block form applies one theta to every layer type.
    one = dict(_without(hf, "rope_parameters"), rope_parameters={"rope_theta": 1e4})
    assert set(from_step35_dict(one).rope_theta) == {1e4}
    # The same value under two spellings (int and float) is no disagreement.
    assert from_step35_dict(dict(flash_raw, num_key_value_heads=8.0)).num_attention_groups == 8
