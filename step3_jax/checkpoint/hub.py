"""Hub checkpoints (safetensors) to the parameter pytree, and back, for either model family.

The Hub format (``shared/spec/model.md`` §3, ``shared/spec/step35.md`` §3): ``model.safetensors``
or shards listed in ``model.safetensors.index.json``, torch-layout ``[out, in]`` tensors, experts
stacked ``[E, out, in]``. The mapping to our layout is not written here: every weight's Hub name,
Hub shape and transform come from its declaration (``family.of(cfg).weights.declare``: a
``weights.WeightSpec`` per leaf, a ``step35_weights.Spec35`` for Step-3.5, whose fixed dtype --
the float32 router bias -- is kept whatever the model dtype, :func:`leaf_dtype`).

Checks, each a one-line :class:`CheckpointError` naming the culprit, made from the safetensors
headers before any tensor data is read: a missing text tensor, an unknown tensor, a wrong shape,
an unsupported dtype, an index naming a file or tensor that is not there, a corrupt file. Vision
tensors of the ``step3_vl`` and ``step3p7`` wrappers are skipped with a notice, and so are a
Step-3.5 checkpoint's multi-token-prediction layers (``model.layers.{i}`` for ``num_hidden_layers
<= i < num_hidden_layers + num_nextn_predict_layers``, spec §3: not used). Two name layouts are read: the
Hub's (``model.layers.0...``) and what transformers' ``save_pretrained`` writes from StepFun's
model code (text under ``model.language_model.``, vision under ``model.vision_model.`` and
``model.vit_*``; ``lm_head.weight`` at the top in both); errors name tensors as the files do. Block-FP8 checkpoints (``F8_E4M3``
values with ``weight_scale_inv`` siblings) are read from the raw bytes and dequantized per
128x128 block (:mod:`step3_jax.model.quant`); an FP8 weight whose scale has the wrong block
grid is an error naming the scale tensor.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from step3_jax.errors import CheckpointError
from step3_jax.model import family, quant
from step3_jax.model.weights import WeightSpec, hub_to_leaf, leaf_to_hub

if TYPE_CHECKING:
    from step3_jax.model.step35_reader import AnyConfig

log = logging.getLogger("step3_jax")

_VISION = ("vision_model.", "vit_downsampler.", "vit_downsampler2.", "vit_large_projector.")
VISION_PREFIXES = _VISION + tuple("model." + p for p in _VISION)  # both layouts
# transformers' save_pretrained of StepFun's model code nests the text model one level down
# (``model.language_model.layers.0...``; ``lm_head.weight`` stays at the top).
TRANSFORMERS_TEXT = "model.language_model."
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SUPPORTED_DTYPES = {"F32", "F16", "BF16"}
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                 "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
                 "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
                 "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class HubReader:
    """Tensor headers and data of a Hub checkpoint directory, read lazily one tensor at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.files: dict[str, Path] = {}  # tensor name -> file
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for name, file in weight_map.items():
                self.files[name] = self.directory / file
            for path in sorted(set(self.files.values())):
                if not path.exists():
                    raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
                present = set(self._open(path).keys())
                for name in sorted(n for n, f in self.files.items() if f == path):
                    if name not in present:
                        raise CheckpointError(f"{name}: listed in {INDEX_FILE} for {path.name} "
                                              "but absent from that file")
        elif (self.directory / SINGLE_FILE).exists():
            path = self.directory / SINGLE_FILE
            self.files = {name: path for name in self._open(path).keys()}
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._stored: dict[str, str] = {}  # our name -> its name in the files, where they differ
        self._read_transformers_layout()

    def _read_transformers_layout(self) -> None:
        """Name ``model.language_model.X`` tensors ``model.X``, as the weight declaration does; a
        tensor stored under both names is an error."""
        renamed = {n: "model." + n[len(TRANSFORMERS_TEXT):] for n in self.files
                   if n.startswith(TRANSFORMERS_TEXT)}
        if not renamed:
            return
        for stored, ours in sorted(renamed.items()):
            if ours in self.files:
                raise CheckpointError(f"{self.directory}: tensor {ours} is stored twice, as "
                                      f"{ours} and as {stored}")
        for stored, ours in renamed.items():
            self.files[ours] = self.files.pop(stored)
            self._stored[ours] = stored
        log.info("transformers layout: reading the %d %s* tensors as model.*", len(renamed),
                 TRANSFORMERS_TEXT)

    def stored_name(self, name: str) -> str:
        """What tensor ``name`` is (or would be) called in this checkpoint's files."""
        if name in self.files or not self._stored or not name.startswith("model."):
            return self._stored.get(name, name)
        return TRANSFORMERS_TEXT + name[len("model."):]

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[path]

    def _slice(self, name: str):
        return self._open(self.files[name]).get_slice(self.stored_name(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * np.dtype(
            _NUMPY_DTYPES.get(self.dtype(name), np.float32)).itemsize

    def read(self, name: str) -> np.ndarray:
        """One tensor, read with plain file reads into a private buffer.

        Not through safetensors' memory map: every mapped page a conversion touches would stay
        resident in this process until the file is closed, so streaming a 642 GB checkpoint
        would show (and, under memory pressure, cost) the whole checkpoint as RSS. The header
        gives the byte range; safetensors itself validated the header at open. This also reads
        ``F8_E4M3``, for which NumPy has no dtype (``ml_dtypes`` supplies it).
        """
        path, stored = self.files[name], self.stored_name(name)
        dtype = self.dtype(name)
        if dtype not in _NUMPY_DTYPES:
            raise CheckpointError(f"{path}: tensor {stored} has unsupported dtype {dtype}")
        try:
            header_len, header = self._header(path)
            entry = header[stored]
            begin, end = entry["data_offsets"]
            with open(path, "rb") as f:
                f.seek(8 + header_len + begin)
                raw = f.read(end - begin)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {stored} ({e})") from None
        np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
        shape = tuple(entry["shape"])
        if len(raw) != math.prod(shape) * np_dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {stored} is truncated ({len(raw)} of "
                                  f"{math.prod(shape) * np_dtype.itemsize} bytes)")
        return np.frombuffer(raw, dtype=np_dtype).reshape(shape)

    def _header(self, path: Path) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                self._headers[path] = (header_len, json.loads(f.read(header_len)))
        return self._headers[path]


def leaf_dtype(spec: WeightSpec, dtype) -> np.dtype:
    """The dtype a weight is held in when the model's is ``dtype``: its declared fixed dtype
    (Step-3.5's float32 router bias, ``step35_weights.Spec35.dtype``), else ``dtype``."""
    return jnp.dtype(getattr(spec, "dtype", None) or dtype)


def specs_of(cfg: AnyConfig) -> tuple[list[WeightSpec], object]:
    """Every declared weight of ``cfg``'s family, in pytree order, and the params treedef."""
    weights = family.of(cfg).weights
    return jax.tree.flatten(weights.declare(cfg), is_leaf=weights.is_spec)


SCALE_SUFFIX = "_scale_inv"


def _mtp_tensors(names: set[str], cfg: AnyConfig) -> list[str]:
    """The tensors of a Step-3.5 checkpoint's multi-token-prediction layers (``model.layers.{i}``,
    ``num_hidden_layers <= i < num_hidden_layers + num_nextn_predict_layers``, spec §3)."""
    if not family.is_step35(cfg) or not cfg.num_nextn_predict_layers:
        return []
    first = cfg.num_hidden_layers
    prefixes = tuple(f"model.layers.{i}." for i in range(first,
                                                         first + cfg.num_nextn_predict_layers))
    return sorted(n for n in names if n.startswith(prefixes))


def check_names(reader: HubReader, cfg: AnyConfig) -> set[str]:
    """Validate the names, dtypes and shapes of the checkpoint from its headers against ``cfg``'s
    declaration; returns the Hub names stored as block FP8 (a ``<name>_scale_inv`` sibling
    exists, ``shared/spec/model.md`` §3). Vision-encoder and MTP tensors are skipped, each kind
    with one notice."""
    specs, _ = specs_of(cfg)
    expected = {spec.hub for spec in specs}
    present = set(reader.files)
    fp8 = {n[: -len(SCALE_SUFFIX)] for n in present if n.endswith(SCALE_SUFFIX)}
    vision = sorted(n for n in present if n.startswith(VISION_PREFIXES))
    if vision:
        log.info("skipping %d vision-encoder tensors (text decoder only)", len(vision))
    mtp = _mtp_tensors(present, cfg)
    if mtp:
        first = cfg.num_hidden_layers
        log.info("skipping %d tensors of the multi-token-prediction layers %d..%d (MTP is not "
                 "used: decoding predicts one token per step)", len(mtp), first,
                 first + cfg.num_nextn_predict_layers - 1)
    scales = {n + SCALE_SUFFIX for n in fp8 & expected}
    unknown = sorted(present - expected - scales - set(vision) - set(mtp))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise CheckpointError(f"{reader.directory}: unknown tensor "
                              f"{reader.stored_name(unknown[0])}{more}")
    missing = sorted(expected - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{reader.directory}: missing tensor "
                              f"{reader.stored_name(missing[0])}{more}")
    for spec in specs:
        _check_tensor(reader, spec, spec.hub in fp8)
    return fp8


def _check_tensor(reader: HubReader, spec: WeightSpec, is_fp8: bool) -> None:
    """The dtype and shape of one weight (and of its FP8 scale), from the headers; errors name
    the tensor as the checkpoint's files do."""
    name, dtype = reader.stored_name(spec.hub), reader.dtype(spec.hub)
    if is_fp8:
        if not quant.is_quantized(spec):
            raise CheckpointError(f"{name}: has a {SCALE_SUFFIX} but this weight is "
                                  "never block-FP8 (router, embedding, LM head, norms)")
        if dtype != "F8_E4M3":
            raise CheckpointError(f"{name}: has a {SCALE_SUFFIX} sibling, so expected "
                                  f"dtype F8_E4M3, got {dtype}")
        scale = spec.hub + SCALE_SUFFIX
        grid = quant.scale_grid(spec.hub_shape)
        if reader.shape(scale) != grid:
            raise CheckpointError(f"{reader.stored_name(scale)}: block grid "
                                  f"{list(reader.shape(scale))} does not match {name} "
                                  f"{list(spec.hub_shape)} in {quant.BLOCK}x{quant.BLOCK} "
                                  f"blocks (expected {list(grid)})")
        if reader.dtype(scale) not in _SUPPORTED_DTYPES:
            raise CheckpointError(f"{reader.stored_name(scale)}: unsupported scale dtype "
                                  f"{reader.dtype(scale)}")
    elif dtype not in _SUPPORTED_DTYPES:
        what = (f" without a {SCALE_SUFFIX} sibling" if dtype.startswith("F8") else "")
        raise CheckpointError(f"{name}: unsupported dtype {dtype}{what} "
                              f"(expected one of {', '.join(sorted(_SUPPORTED_DTYPES))})")
    if reader.shape(spec.hub) != spec.hub_shape:
        raise CheckpointError(f"{name}: expected shape {list(spec.hub_shape)}, "
                              f"got {list(reader.shape(spec.hub))}")


def read_leaf(reader: HubReader, spec: WeightSpec, cfg: AnyConfig, fp8: set[str],
              keep_fp8: bool = False):
    """One weight from the Hub as a host array in the declared layout (block-FP8 tensors
    dequantized to float32), or, with ``keep_fp8``, as a host :class:`quant.Fp8Weight`."""
    arr = reader.read(spec.hub)
    if spec.hub in fp8:
        scale = reader.read(spec.hub + SCALE_SUFFIX)
        if keep_fp8:
            return quant.from_hub(arr, scale, spec)
        arr = quant.dequantize_np(arr, scale, spec.hub)
    return hub_to_leaf(arr, spec, cfg)


def read_leaves(directory: str | Path, cfg: AnyConfig, keep=None, progress: bool = True):
    """The source stage of loading: each weight of ``cfg``'s declaration, in declaration order, as
    a host array in the declared (stacked) layout and its :func:`leaf_dtype` — block-FP8 tensors
    dequantized — or None where ``keep`` (a params-shaped tree of bools) says False.

    A generator: one tensor is read and converted at a time, so a caller that places each
    before asking for the next holds about one tensor on the host. Every header is checked
    before the first tensor is read.
    """
    reader = HubReader(directory)
    specs, treedef = specs_of(cfg)
    fp8 = check_names(reader, cfg)
    if fp8:
        log.info("%d block-FP8 weights: dequantizing to %s", len(fp8), cfg.dtype)
    flat_keep = treedef.flatten_up_to(keep) if keep is not None else [True] * len(specs)
    total = sum(math.prod(s.shape) * leaf_dtype(s, cfg.dtype).itemsize
                for s, k in zip(specs, flat_keep) if k)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress,
              leave=False) as bar:
        for spec, kept in zip(specs, flat_keep):
            if not kept:
                yield None
                continue
            host = read_leaf(reader, spec, cfg, fp8).astype(leaf_dtype(spec, cfg.dtype))
            yield host
            bar.update(host.nbytes)


def load_hub(directory: str | Path, cfg: AnyConfig, progress: bool = True):
    """A Hub checkpoint as ``cfg``'s parameter pytree (``Params`` or ``Params35``) in the
    canonical stacked layout, on the default device (:func:`step3_jax.checkpoint.loader.load` is
    the full pipeline: runtime layout and placement)."""
    _, treedef = specs_of(cfg)
    return treedef.unflatten([jnp.asarray(host) for host in read_leaves(directory, cfg,
                                                                          progress=progress)])


def to_hub(params, cfg: AnyConfig) -> dict[str, np.ndarray]:
    """The Hub-named, torch-layout tensors of ``params`` (host NumPy arrays, params' dtype)."""
    specs, _ = specs_of(cfg)
    stacked = family.of(cfg).weights.stack_experts(params)
    return {spec.hub: leaf_to_hub(np.asarray(value), spec, cfg)
            for spec, value in zip(specs, jax.tree.leaves(stacked))}
