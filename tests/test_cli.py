"""The ``step3-jax`` CLI: JSON contracts, text prompts through a tokenizer, and bad input.

Most cases call ``cli.main`` in-process (fast); two run the installed console script in a
subprocess to check the real exit code, the stdout/stderr split and the absence of tracebacks.
"""

import json
import shutil
import subprocess
import sys

import pytest

from step3_jax.cli import app as cli
from step3_jax.runtime import metrics
from step3_jax.runtime.generate import generate, score

from conftest import run_cli


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, hub_dir):
    """The tiny Hub checkpoint plus a word-level tokenizer.json ("w0".."w249")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("tok")
    for f in hub_dir.iterdir():
        shutil.copy(f, directory / f.name)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(250)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_generate_json_is_one_document_matching_the_api(capsys, hub_dir, tiny_params, tiny_cfg):
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(hub_dir), "--prompt-ids", "3,17,42",
                         "--prompt-ids", "5,6", "--max-new-tokens", "5", "--json", "--quiet")
    assert code == 0
    doc = json.loads(out)  # exactly one JSON document
    assert [r["prompt_ids"] for r in doc["results"]] == [[3, 17, 42], [5, 6]]
    want, _ = generate(tiny_params, tiny_cfg, [[3, 17, 42], [5, 6]], max_new_tokens=5)
    assert [r["generated_ids"] for r in doc["results"]] == [w.generated_ids for w in want]
    assert {"decode_step_ms", "compile_s", "prefill_ms"} <= set(doc["metrics"])


def test_text_prompt_and_text_output_through_the_tokenizer(capsys, tok_dir):
    code, out, _ = run_cli(capsys, "generate", "--checkpoint", str(tok_dir), "--prompt", "w3 w17 w42",
                       "--max-new-tokens", "4", "--json", "--quiet")
    assert code == 0
    (r,) = json.loads(out)["results"]
    assert r["prompt_ids"] == [3, 17, 42]
    assert r["text"] == " ".join(f"w{i}" for i in r["generated_ids"])


def test_score_json_matches_the_api(capsys, hub_dir, tiny_params, tiny_cfg):
    code, out, _ = run_cli(capsys, "score", "--checkpoint", str(hub_dir), "--ids", "3,17,42,99",
                       "--json", "--quiet")
    assert code == 0
    doc = json.loads(out)
    assert doc["ids"] == [3, 17, 42, 99] and len(doc["logprobs"]) == 3
    assert doc["logprobs"] == pytest.approx(score(tiny_params, tiny_cfg, [3, 17, 42, 99]),
                                            abs=1e-6)
    assert all(lp < 0 for lp in doc["logprobs"])


def test_score_text(capsys, tok_dir):
    code, out, _ = run_cli(capsys, "score", "--checkpoint", str(tok_dir), "--text", "w1 w2 w3",
                       "--json", "--quiet")
    assert code == 0 and json.loads(out)["ids"] == [1, 2, 3]


def test_info_reports_step3_numbers(capsys):
    code, out, _ = run_cli(capsys, "info", "--config", "step3", "--json")
    doc = json.loads(out)
    assert code == 0
    assert round(doc["parameters"] / 1e9, 1) == 316.3
    assert round(doc["activated_parameters"] / 1e9, 1) == 37.9
    assert doc["kv_bytes_per_token"]["fp8"] == 31232  # spec §2: 61 x 512 B


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt-ids", "1"],
     "checkpoint directory /nonexistent/ckpt does not exist"),
    (["generate", "--config", "tiny", "--prompt-ids", "1,2,250"],
     "token id 250 in prompt 0 is outside the vocabulary"),
    (["generate", "--prompt-ids", "1,2,258"], "token id 258 in prompt 0 is outside the vocabulary"),
    (["generate", "--config", "tiny", "--prompt-ids", ",".join(["1"] * 513)],
     "longer than the context"),
    (["generate", "--prompt-ids", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--prompt-ids", "1", "--temperature", "inf"],
     "--temperature must be >= 0 and finite in float32 (0 = greedy), got inf"),
    (["generate", "--prompt-ids", "1", "--eos-id", "99999"],
     "--eos-id 99999 is outside the vocabulary (0..257)"),
    (["generate", "--config", "tiny", "--prompt-ids", "1", "--eos-id", "5", "--eos-id", "-3"],
     "--eos-id -3 is outside the vocabulary (0..249)"),
    (["generate", "--prompt-ids", "1", "--top-p", "1.01"], "--top-p must be in (0, 1]"),
    (["generate", "--config", "tiny", "--prompt", "hello"], "needs a tokenizer.json"),
    (["generate"], "no prompt"),
    (["generate", "--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["score", "--ids", "1"], "at least 2 tokens"),
    (["info", "--config", "nope"], "unknown config 'nope'"),
    (["generate", "--prompt-ids", "1", "--mesh", "dp=64"], "needs 64 devices, only 8 available"),
    (["generate", "--prompt-ids", "1", "--mesh", "ep=3"], "mesh ep=3 does not divide"),
    (["generate", "--prompt-ids", "1", "--afd", "2:2", "--mesh", "dp=2"], "are exclusive"),
    (["generate", "--prompt-ids", "1", "--afd", "two"], "--afd must be A:F"),
    (["generate", "--prompt-ids", "1", "--afd", "6:4"], "needs 10 devices, only 8"),
    (["score", "--ids", "1,2", "--afd", "2:2", "--micro-batches", "0"],
     "--micro-batches must be >= 1"),
    (["estimate", "--hardware", "B200"], "unknown hardware 'B200'"),
    (["estimate", "--afd", "2x2"], "--afd must be A:F"),
    (["estimate", "--afd", "0:2"], "at least one attention and one FFN server"),
    (["estimate", "--context", "-4096"], "--context must be a positive"),
    (["estimate", "--batch", "0"], "--batch must be >= 1"),
    (["estimate", "--micro-batches", "0"], "--micro-batches must be >= 1"),
    (["estimate", "--attention-dtype", "int4"], "--attention-dtype must be fp8 or bf16"),
    (["estimate", "--config", "nope"], "unknown config 'nope'"),
    (["cost", "--context", "-1"], "--context must be a positive"),
    (["cost", "--context", "0", "--json"], "--context must be a positive"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("step3-jax: error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, where, fragment", [
    (["generate", "--max-new-tokens", "x"], "generate",
     "argument --max-new-tokens: invalid int value: 'x'"),
    (["generate", "--prompt-ids", "1,a"], "generate", "expected comma-separated token ids"),
    (["score", "--ids", "1,2", "--bogus", "x"], "score", "unrecognized arguments: --bogus x"),
    (["convert", "--out", "x"], "convert", "the following arguments are required: --hf"),
    (["bench", "--dtype", "int8"], "bench", "argument --dtype: invalid choice: 'int8'"),
    (["nosuch"], "", "argument COMMAND: invalid choice: 'nosuch'"),
    ([], "", "the following arguments are required: COMMAND"),
    (["launch", "--processes", "2", "--", "generate", "--afd", "1:1", "--top-k", "x"],
     "generate", "argument --top-k: invalid int value: 'x'"),
])
def test_argparse_errors_are_one_line(capsys, argv, where, fragment):
    """Issue 17: no usage block, one line naming the subcommand and where its help is."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    prefix = f"step3-jax: error: {where}: " if where else "step3-jax: error: "
    assert line.startswith(prefix) and fragment in line, line
    assert line.endswith(f"(see step3-jax{' ' + where if where else ''} --help)"), line


def test_an_argparse_error_exits_2_in_a_process_without_starting_jax():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "step3_jax.cli", "generate",
                           "--temperature", "warm"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == ["step3-jax: error: generate: argument --temperature: invalid float value: "
                      "'warm' (see step3-jax generate --help)"]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "step3_jax.cli.app" in imported and "jax" not in imported


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: (d / "config.json").write_text("{broken"), "invalid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"hidden_size": 64})),
     "missing required key(s)"),
    # Issue 17 item 14: was "unknown tensor model.layers.1.moe.down_proj.weight (and 27 more)".
    (lambda d: (d / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "config.json").read_text()).items()
         if k != "moe_layers_enum"})),
     'moe_layers_enum is missing (8 experts configured but no MoE layers named): add it, e.g. '
     '"1,2,3" for every layer after the first'),
])
def test_bad_checkpoint_config_is_one_line(capsys, tmp_path, hub_dir, mutate, fragment):
    directory = tmp_path / "ckpt"
    shutil.copytree(hub_dir, directory)
    mutate(directory)
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(directory), "--prompt-ids", "1")
    assert code == 2 and fragment in err and "Traceback" not in err


def test_a_config_that_does_not_match_the_checkpoint_is_named(capsys, hub_dir):
    """Issue 17 item 5: --config beside --checkpoint replaced the checkpoint's config, and a
    mismatch surfaced as "unknown tensor ... (and 17 more)"; now one line naming the fields."""
    code, out, err = run_cli(capsys, "generate", "--config", "bench", "--checkpoint", str(hub_dir),
                             "--prompt-ids", "1")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"step3-jax: error: config 'bench' does not match the checkpoint "
                          f"{hub_dir}: hidden_size 1024 (checkpoint: 64), "), err
    assert "without --config the checkpoint's own config.json is used" in err
    # The checkpoint's own config.json, named explicitly, matches.
    code, out, err = run_cli(capsys, "score", "--config", str(hub_dir / "config.json"),
                             "--checkpoint", str(hub_dir), "--ids", "1,2,3", "--json", "-q")
    assert code == 0 and json.loads(out)["ids"] == [1, 2, 3], err


def test_help_on_every_subcommand(capsys):
    for sub in ([], ["generate"], ["score"], ["info"]):
        with pytest.raises(SystemExit) as e:
            cli.main([*sub, "--help"])
        assert e.value.code == 0
        assert "usage: step3-jax" in capsys.readouterr().out


def test_checkpoint_help_names_both_formats_and_the_default(capsys):
    for sub in ("generate", "score"):
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "a Hub checkpoint directory (config.json + safetensors) or an orbax store" in text
        assert "with neither, the demo model shipped in the package" in text


def test_console_script_end_to_end():
    """The README's main job: the installed script, default embedded model, JSON on stdout."""
    exe = shutil.which("step3-jax") or pytest.fail("step3-jax console script not installed")
    proc = subprocess.run([exe, "generate", "--prompt", "def ", "--max-new-tokens", "4",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["results"][0]["generated_ids"]) == 4
    assert doc["metrics"]["config"] == "demo" and isinstance(doc["results"][0]["text"], str)
    bad = subprocess.run([exe, "generate", "--prompt-ids", "1,2,999"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert "token id 999" in bad.stderr.strip().splitlines()[-1]


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "step3_jax.cli", "info", "--config", "tiny"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "parameters" in proc.stdout


def test_generate_on_a_mesh_matches_one_device(capsys, hub_dir):
    argv = ["generate", "--checkpoint", str(hub_dir), "--prompt-ids", "3,17,42", "--prompt-ids",
            "5,6", "--prompt-ids", "9", "--max-new-tokens", "4", "--json", "--quiet"]
    code, one, _ = run_cli(capsys, *argv)
    code2, sharded, _ = run_cli(capsys, *argv, "--mesh", "dp=2,tp=2,ep=2")
    assert code == code2 == 0
    a, b = json.loads(one), json.loads(sharded)
    assert a["results"] == b["results"]
    assert b["metrics"]["mesh"] == {"dp": 2, "tp": 2, "ep": 2}


def test_generate_and_score_under_afd(capsys, hub_dir):
    base = ["--checkpoint", str(hub_dir), "--json", "--quiet"]
    gen = ["generate", "--prompt-ids", "3,17,42", "--prompt-ids", "5,6", "--prompt-ids", "9",
           "--max-new-tokens", "4", *base]
    _, one, _ = run_cli(capsys, *gen)
    code, split, _ = run_cli(capsys, *gen, "--afd", "3:2", "--micro-batches", "2",
                             "--afd-transfer-dtype", "float32")
    a, b = json.loads(one), json.loads(split)
    assert code == 0 and a["results"] == b["results"]
    # One metrics schema; AFD's placement and stage metrics beside it, once (issue 17).
    assert set(a["metrics"]) == set(b["metrics"]) == {"config", *metrics.KEYS}
    assert set(b) == {"results", "metrics", "placement", "afd"}
    assert b["placement"] == {"attention_devices": [0, 1, 2], "ffn_devices": [3, 4]}
    assert b["afd"]["micro_batches"] == 2 and "bubble_fraction" in b["afd"]
    sc = ["score", "--ids", "3,17,42,99", *base]
    _, plain, _ = run_cli(capsys, *sc)
    code, fp8, _ = run_cli(capsys, *sc, "--afd", "2:2")
    assert code == 0
    assert json.loads(fp8)["logprobs"] == pytest.approx(json.loads(plain)["logprobs"], abs=0.2)
