"""Shared fixtures. Eight emulated CPU devices are requested before JAX initializes."""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the run, made by the first process to load this file
# (pytest, or xdist's controller) and inherited by the workers and every CLI subprocess: the
# suite compiles the same small programs many times over (each CLI run builds its own), and a
# hit takes a tiny-model `generate` from 24 s to 9 s. Removed when its owner exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="step3-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step3_jax.model.config import from_hub_dict, presets_dir  # noqa: E402

import reference as ref  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv):
    """``step3-jax ARGV`` in-process: ``(exit code, stdout, stderr)``."""
    from step3_jax.cli import app as cli

    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def tiny_raw() -> dict:
    return json.loads((presets_dir() / "tiny.json").read_text())


@pytest.fixture(scope="session")
def tiny_cfg(tiny_raw):
    return from_hub_dict(tiny_raw, name="tiny")


@pytest.fixture(scope="session")
def hub_state(tiny_raw) -> dict:
    """Random Hub-named, torch-layout tensors written by the independent reference."""
    return ref.random_hub_state(tiny_raw, seed=0)


def write_hub_checkpoint(directory: Path, raw_config: dict, state: dict, shards: int = 1,
                         wrapper: bool = False) -> Path:
    """A Hub-format checkpoint: config.json plus one model.safetensors or indexed shards."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "step3_vl", "text_config": raw_config} if wrapper else raw_config
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    if shards == 1:
        save_file({n: np.ascontiguousarray(state[n]) for n in names},
                  str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: np.ascontiguousarray(state[n]) for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory, tiny_raw, hub_state) -> Path:
    return write_hub_checkpoint(tmp_path_factory.mktemp("hub"), tiny_raw, hub_state, shards=3)


@pytest.fixture(scope="session")
def tiny_params(hub_dir, tiny_cfg):
    from step3_jax.checkpoint.hub import load_hub

    return load_hub(hub_dir, tiny_cfg, progress=False)
