"""``step3-jax convert`` (Hub safetensors -> orbax store) and ``step3-jax export`` (back), for
either model family (Step-3 or Step-3.5, by the checkpoint's ``config.json``), and
:func:`save_hub`: in-memory params written as a Hub checkpoint by the same writer.

Both stream one weight at a time — read a tensor, write it, free it
(:mod:`step3_jax.checkpoint.streaming`) — so host memory peaks at a few of the largest tensor
(a stacked expert weight of the full model is 3.5 GB in BF16), whatever the layer size, never the
model (642 GB). Everything that can be checked from the safetensors headers (names, shapes,
dtypes, FP8 block grids) is checked before the first byte is written; the output is built in a
temporary sibling directory and renamed into place only when complete, so a failed or
interrupted run leaves nothing loadable at ``--out`` and a re-run starts clean.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from step3_jax.checkpoint import chunks, store, streaming
from step3_jax.checkpoint.hub import (INDEX_FILE, SCALE_SUFFIX, HubReader, check_names,
                                      leaf_dtype, leaf_to_hub, read_leaf)
from step3_jax.checkpoint.loader import checkpoint_dir
from step3_jax.errors import CheckpointError, ConfigError
from step3_jax.model import family, quant
from step3_jax.model.step35_reader import from_any_dict, load_any_config
from step3_jax.model.weights import is_spec

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
    from_any_dict(raw, where=str(path))  # validates; raises a one-line ConfigError
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

    ``weights``: ``bfloat16`` or ``float32`` (FP8 sources dequantized; a weight declared with a
    fixed dtype, Step-3.5's float32 router bias, keeps it), or ``fp8`` (Step-3 only: FP8 sources
    kept as they are, other sources block-quantized; router, embedding, LM head and norms stay
    BF16). Returns a summary (bytes read and written, seconds).
    """
    import time

    if weights not in store.STORAGE_DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(store.STORAGE_DTYPES)}, "
                              f"got {weights!r}")
    src = checkpoint_dir(hf_dir)
    raw = _raw_config(src)
    cfg = from_any_dict(raw, where=str(src / "config.json"), dtype="float32")
    if weights == "fp8":
        store.refuse_fp8(cfg)
    reader = HubReader(src)
    decl = family.of(cfg).weights.declare(cfg)
    fp8 = check_names(reader, cfg)
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

        def read(spec):
            """One weight in the storage dtype (FP8 storage: an Fp8Weight), counted on the bar."""
            leaf = read_leaf(reader, spec, cfg, fp8, keep_fp8=weights == "fp8")
            bar.update(reader.nbytes(spec.hub) + (reader.nbytes(spec.hub + SCALE_SUFFIX)
                                                  if spec.hub in fp8 else 0))
            if weights != "fp8":
                return leaf.astype(leaf_dtype(spec, weights), copy=False)
            if quant.is_quantized(spec) and not isinstance(leaf, quant.Fp8Weight):
                return quant.quantize_leaf(leaf, spec)
            return leaf if isinstance(leaf, quant.Fp8Weight) else leaf.astype(ml_dtypes.bfloat16)

        for name in chunks.chunk_names(cfg):
            chunk = jax.tree.map(lambda spec: _lazy_leaf(spec, weights, read),
                                 chunks.chunk_of(decl, name), is_leaf=is_spec)
            written += sum(a.nbytes for a in jax.tree.leaves(chunk))
            w.write_chunk(name, chunk)
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


def _lazy_leaf(spec, weights: str, read):
    """The :class:`streaming.Lazy` leaf (an FP8 weight: a pair) of one weight, ``read(spec)``
    only when orbax writes it."""
    if weights == "fp8" and quant.is_quantized(spec):
        abstract = quant.abstract_fp8(spec)

        def parts():
            weight = read(spec)
            return np.asarray(weight.values), np.asarray(weight.scales, np.float32)

        values, scales = streaming.lazy_pair(parts, (abstract.values.shape, abstract.values.dtype),
                                             (abstract.scales.shape, abstract.scales.dtype))
        return quant.Fp8Weight(values, scales, abstract.view)
    dtype = ml_dtypes.bfloat16 if weights == "fp8" else leaf_dtype(spec, weights)
    return streaming.Lazy(spec.shape, dtype, lambda: read(spec))


def _hub_tensors(spec, value, cfg) -> dict[str, np.ndarray]:
    """One restored weight as Hub-named torch-layout tensors (FP8: values + ``_scale_inv``)."""
    if isinstance(value, quant.Fp8Weight):
        return {spec.hub: np.asarray(value.values).reshape(quant.matrix_view(spec)),
                spec.hub + SCALE_SUFFIX: np.asarray(value.scales)}
    return {spec.hub: leaf_to_hub(np.asarray(value), spec, cfg)}


def _hub_layout(specs, weights: str) -> dict[str, tuple]:
    """The Hub tensors of a chunk's weights as ``name -> (shape, dtype)``, in declaration order:
    the header of its safetensors shard, known before any weight is restored."""
    out = {}
    for spec in jax.tree.leaves(specs, is_leaf=is_spec):
        if weights == "fp8" and quant.is_quantized(spec):
            view = quant.matrix_view(spec)
            out[spec.hub] = (view, ml_dtypes.float8_e4m3fn)
            out[spec.hub + SCALE_SUFFIX] = (quant.scale_grid(view), np.float32)
        else:
            out[spec.hub] = (spec.hub_shape, ml_dtypes.bfloat16 if weights == "fp8"
                             else leaf_dtype(spec, weights))
    return out


def _write_hub(out: str | Path, cfg, raw: dict, weights: str, leaves, *, force: bool,
               progress: bool, side_from: Path | None = None, desc: str = "exporting") -> dict:
    """The Hub directory at ``out``, built in a staging sibling and renamed into place: one
    safetensors shard per chunk (``chunks.chunk_names``) whose tensors ``leaves(chunk)`` yields as
    ``(spec, value)`` in declaration order (a value in its Hub dtype for ``weights``, or an
    :class:`quant.Fp8Weight`), each written before the next is asked for; then
    ``model.safetensors.index.json``, ``config.json`` (``raw``) and the side files of
    ``side_from``."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"output directory {out} is not empty (pass --force to replace it)")
    _clean_stale(out)
    tmp = streaming.staging_dir(out)
    decl = family.of(cfg).weights.declare(cfg)
    names = chunks.chunk_names(cfg)
    weight_map, total = {}, 0
    try:
        for i, name in enumerate(tqdm(names, desc=desc, unit="layer", disable=not progress)):
            file = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
            layout = _hub_layout(chunks.chunk_of(decl, name), weights)
            with streaming.SafetensorsWriter(tmp / file, layout, {"format": "pt"}) as shard:
                for spec, value in leaves(name):
                    for tensor, array in _hub_tensors(spec, value, cfg).items():
                        shard.write(tensor, array)
                        total += array.nbytes
            weight_map.update({t: file for t in layout})
            streaming.release_memory()
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for side in SIDE_FILES if side_from is not None else ():
            if (side_from / side).is_file():
                shutil.copyfile(side_from / side, tmp / side)
        streaming.publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %d tensors in %d shards (%.2f GB)", out, len(weight_map), len(names),
             total / 1e9)
    return {"output": str(out), "tensors": len(weight_map), "shards": len(names), "bytes": total}


def export(checkpoint: str | Path, out: str | Path, *, force: bool = False,
           progress: bool = True) -> dict:
    """Write a store back in the Hub format: one safetensors shard per layer (plus the embedding
    and the head), ``model.safetensors.index.json``, ``config.json`` and the side files. The
    stored dtype is kept (FP8 stores become block-FP8 Hub tensors with ``weight_scale_inv``).
    Streams a weight at a time: each is restored alone and appended to its shard."""
    src = checkpoint_dir(checkpoint)
    if not store.is_store(src):
        raise CheckpointError(f"{src}: not a step3-jax orbax checkpoint (no {store.MANIFEST}); "
                              "export reads what `step3-jax convert` writes")
    manifest = store.read_manifest(src)
    stored = "bfloat16" if manifest["weights"] == "fp8" else manifest["weights"]
    cfg = load_any_config(src, dtype=stored)
    raw = json.loads((src / "config.json").read_text())
    with store.Reader(src, cfg) as reader:
        summary = _write_hub(out, cfg, raw, manifest["weights"], reader.leaves, force=force,
                             progress=progress, side_from=src)
    return {"input": str(src), **summary, "weights": manifest["weights"]}


def save_hub(params, cfg, out: str | Path, *, dtype: str | None = None, force: bool = False,
             progress: bool = False, raw_config: dict | None = None) -> dict:
    """Write ``params`` (either family, any expert layout or placement) as a Hub checkpoint
    directory at ``out``: what :func:`export` writes (shards per layer, index, ``config.json``),
    from memory instead of a store, a weight gathered to the host at a time. ``dtype``:
    ``bfloat16`` or ``float32`` (default ``cfg.dtype``; FP8 nodes are dequantized; a weight with
    a fixed dtype keeps it). ``raw_config``: the ``config.json`` to write (default
    ``cfg.to_hub_dict()``, the Hub spelling of the architecture)."""
    weights = dtype or str(jnp.dtype(cfg.dtype))
    if weights not in _STORAGE:
        raise CheckpointError(f"dtype must be one of {', '.join(_STORAGE)}, got {weights!r}")
    params = family.of(cfg).weights.stack_experts(params)
    decl = family.of(cfg).weights.declare(cfg)

    def leaves(name):
        specs = jax.tree.leaves(chunks.chunk_of(decl, name), is_leaf=is_spec)
        values = jax.tree.leaves(chunks.chunk_of(params, name), is_leaf=quant.is_fp8)
        for spec, value in zip(specs, values, strict=True):
            host = np.asarray(quant.materialize(value, jnp.float32))
            yield spec, host.astype(leaf_dtype(spec, weights))

    raw = raw_config if raw_config is not None else cfg.to_hub_dict()
    return _write_hub(out, cfg, raw, weights, leaves, force=force, progress=progress,
                      desc="writing")
