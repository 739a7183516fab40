"""``step3-jax convert`` (Hub safetensors -> orbax store) and ``step3-jax export`` (back).

Both stream one layer at a time — read a layer's tensors, write them, free them — so host
memory peaks at about one layer (an MoE layer of the full model is ~10.6 GB in BF16), never the
model (642 GB). Everything that can be checked from the safetensors headers (names, shapes,
dtypes, FP8 block grids) is checked before the first byte is written; the output is built in a
temporary sibling directory and renamed into place only when complete, so a failed or
interrupted run leaves nothing loadable at ``--out`` and a re-run starts clean.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from step3_jax.checkpoint import store
from step3_jax.checkpoint.hub import (INDEX_FILE, SCALE_SUFFIX, HubReader, _check_names,
                                      leaf_to_hub, read_leaf)
from step3_jax.checkpoint.loader import checkpoint_dir
from step3_jax.errors import CheckpointError, ConfigError
from step3_jax.model import quant
from step3_jax.model.config import from_hub_dict, load_config
from step3_jax.model.weights import declare, is_spec

log = logging.getLogger("step3_jax")

# Files copied beside a converted or exported checkpoint (tokenizer and generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")
_STORAGE = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def _raw_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (a checkpoint directory needs a config.json)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    from_hub_dict(raw, where=str(path))  # validates; raises a one-line ConfigError
    return raw


def _storage_config(raw: dict, weights: str) -> dict:
    """The config written beside a store: the source's, minus a quantization_config that no
    longer describes the stored weights (the manifest records the storage dtype)."""
    raw = dict(raw)
    raw.pop("quantization_config", None)
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"] = {k: v for k, v in raw["text_config"].items()
                              if k != "quantization_config"}
    if weights == "fp8":
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic",
                                      "weight_block_size": [quant.BLOCK, quant.BLOCK]}
    return raw


def _clean_stale(out: Path) -> None:
    """Remove what a killed earlier run left beside ``out`` (its temporary directory)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        log.info("removing %s left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)


def convert(hf_dir: str | Path, out: str | Path, *, weights: str = "bfloat16",
            force: bool = False, progress: bool = True) -> dict:
    """Convert a Hub checkpoint (bf16/fp16/f32 or block FP8) into a store at ``out``.

    ``weights``: ``bfloat16`` or ``float32`` (FP8 sources dequantized), or ``fp8`` (FP8 sources
    kept as they are, other sources block-quantized; router, embedding, LM head and norms stay
    BF16). Returns a summary (bytes read and written, seconds).
    """
    import time

    if weights not in store.STORAGE_DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(store.STORAGE_DTYPES)}, "
                              f"got {weights!r}")
    src = checkpoint_dir(hf_dir)
    raw = _raw_config(src)
    cfg = from_hub_dict(raw, where=str(src / "config.json"), dtype="float32")
    reader = HubReader(src)
    decl = declare(cfg)
    fp8 = _check_names(reader, jax.tree.leaves(decl, is_leaf=is_spec))
    out = Path(out).expanduser().absolute()
    if out == src.absolute():
        raise CheckpointError(f"--out {out} is the input directory")
    _clean_stale(out)
    read_names = [s.hub for s in jax.tree.leaves(decl, is_leaf=is_spec)]
    source_bytes = sum(reader.nbytes(n) for n in read_names + [n + SCALE_SUFFIX for n in fp8])
    start = time.perf_counter()
    written = 0
    with store.Writer(out, _storage_config(raw, weights), weights, force=force,
                      extra={"source": str(src)}) as w, \
            tqdm(total=source_bytes, unit="B", unit_scale=True, desc="converting",
                 disable=not progress) as bar:
        for name in store.chunk_names(cfg):
            specs = store.chunk_of(decl, name)

            def one(spec):
                leaf = read_leaf(reader, spec, cfg, fp8, keep_fp8=weights == "fp8")
                bar.update(reader.nbytes(spec.hub) + (reader.nbytes(spec.hub + SCALE_SUFFIX)
                                                      if spec.hub in fp8 else 0))
                if weights != "fp8":
                    leaf = leaf.astype(_STORAGE[weights], copy=False)
                elif quant.is_quantized(spec) and not isinstance(leaf, quant.Fp8Weight):
                    leaf = quant.quantize_leaf(leaf, spec)
                elif not isinstance(leaf, quant.Fp8Weight):
                    leaf = leaf.astype(ml_dtypes.bfloat16)
                return leaf

            chunk = jax.tree.map(one, specs, is_leaf=is_spec)
            written += sum(a.nbytes for a in jax.tree.leaves(chunk))
            w.write_chunk(name, chunk)
            del chunk
        for side in SIDE_FILES:
            if (src / side).is_file():
                w.copy_beside(src / side)
        w.commit()
    seconds = time.perf_counter() - start
    log.info("wrote %s (%s weights, %.2f GB of arrays) in %.1f s", out, weights, written / 1e9,
             seconds)
    return {"input": str(src), "output": str(out), "weights": weights,
            "fp8_source_tensors": len(fp8), "bytes_read": source_bytes,
            "array_bytes_written": written, "bytes_on_disk": store.stored_bytes(out),
            "seconds": round(seconds, 3)}


def _hub_tensors(chunk, specs, cfg) -> dict[str, np.ndarray]:
    """One restored chunk as Hub-named torch-layout tensors (FP8: values + ``_scale_inv``)."""
    tensors = {}

    def one(spec, value):
        if isinstance(value, quant.Fp8Weight):
            v = np.asarray(value.values).reshape(quant.matrix_view(spec))
            s = np.asarray(value.scales)
            tensors[spec.hub] = np.ascontiguousarray(v)
            tensors[spec.hub + SCALE_SUFFIX] = np.ascontiguousarray(s)
        else:
            tensors[spec.hub] = leaf_to_hub(np.asarray(value), spec, cfg)

    jax.tree.map(one, specs, chunk, is_leaf=is_spec)
    return tensors


def export(checkpoint: str | Path, out: str | Path, *, force: bool = False,
           progress: bool = True) -> dict:
    """Write a store back in the Hub format: one safetensors shard per layer (plus the embedding
    and the head), ``model.safetensors.index.json``, ``config.json`` and the side files. The
    stored dtype is kept (FP8 stores become block-FP8 Hub tensors with ``weight_scale_inv``)."""
    src = checkpoint_dir(checkpoint)
    if not store.is_store(src):
        raise CheckpointError(f"{src}: not a step3-jax orbax checkpoint (no {store.MANIFEST}); "
                              "export reads what `step3-jax convert` writes")
    manifest = store.read_manifest(src)
    stored = "bfloat16" if manifest["weights"] == "fp8" else manifest["weights"]
    cfg = load_config(src, dtype=stored)
    raw = json.loads((src / "config.json").read_text())
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"output directory {out} is not empty (pass --force to replace it)")
    _clean_stale(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    decl = declare(cfg)
    names = store.chunk_names(cfg)
    weight_map, total = {}, 0
    try:
        with store.Reader(src, cfg) as reader:
            for i, name in enumerate(tqdm(names, desc="exporting", unit="layer",
                                          disable=not progress)):
                tensors = _hub_tensors(reader.read(name), store.chunk_of(decl, name), cfg)
                file = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({t: file for t in tensors})
                total += sum(a.nbytes for a in tensors.values())
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for side in SIDE_FILES:
            if (src / side).is_file():
                shutil.copy2(src / side, tmp / side)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %d tensors in %d shards (%.2f GB)", out, len(weight_map), len(names),
             total / 1e9)
    return {"input": str(src), "output": str(out), "weights": manifest["weights"],
            "tensors": len(weight_map), "shards": len(names), "bytes": total}


def peak_layer_bytes(cfg, weights: str) -> int:
    """The largest chunk's array bytes in ``weights`` storage: the streaming memory unit."""
    itemsize = 1 if weights == "fp8" else np.dtype(_STORAGE[weights]).itemsize
    decl = declare(cfg)
    return max(sum(math.prod(s.shape) * itemsize
                   for s in jax.tree.leaves(store.chunk_of(decl, n), is_leaf=is_spec))
               for n in store.chunk_names(cfg))
