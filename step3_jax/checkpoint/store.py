"""The orbax checkpoint directory: saved and restored one chunk (one layer) at a time.

Layout of a directory written by :func:`save` (``step3-jax convert`` and ``tools/train_demo.py``)::

    DIR/config.json          the Hub text config (read by config.load_config as for a Hub dir)
    DIR/step3_jax.json       the manifest: format, version, stored weight dtype, chunk names
    DIR/embed/               one orbax checkpoint per chunk: the embedding,
    DIR/layer_000/ ...       each decoder layer (canonical stacked experts),
    DIR/head/                the final norm and the LM head

A chunk is written a tensor at a time (:mod:`step3_jax.checkpoint.streaming`: each weight is
read, written and freed before the next), and one orbax checkpoint per layer is what makes
restore sharded and layer by layer: each chunk is restored straight onto its target
shardings (``jax.ShapeDtypeStruct`` targets from the weight declaration), so no weight is ever
whole on one device, and shapes are checked against the stored metadata first, because orbax
would otherwise pad or crop a mismatched array silently.

Stored dtypes: ``bfloat16`` or ``float32`` arrays (restored and cast to the compute dtype; a
weight declared with a fixed dtype, Step-3.5's float32 router bias, is stored and restored in it),
or ``fp8`` (Step-3 only): the matmul weights as :class:`step3_jax.model.quant.Fp8Weight` nodes
(e4m3 values plus float32 block scales) that the model consumes as they are; norms, router,
embedding and LM head stay bfloat16, as in the paper. Either model family is stored alike: the
structure comes from ``family.of(cfg).weights.declare`` and ``config.json`` names the family.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import serialization
from tqdm.auto import tqdm

from step3_jax import interrupts
from step3_jax.checkpoint import streaming
from step3_jax.checkpoint.chunks import declaration, stored_state, assemble, chunk_names, chunk_of
from step3_jax.checkpoint.hub import leaf_dtype
from step3_jax.errors import CheckpointError
from step3_jax.model import family, quant
from step3_jax.model.weights import is_spec

if TYPE_CHECKING:
    from step3_jax.model.step35_reader import AnyConfig

MANIFEST = "step3_jax.json"
FORMAT = "step3-jax/orbax"
VERSION = 2  # v2: matmul weights in the Hub [out, in] layout (v1 stored them [in, out])
STORAGE_DTYPES = ("bfloat16", "float32", "fp8")
_PLACEHOLDER = ...  # marks a leaf left out of a restore (the value of ocp.PLACEHOLDER)


# ----- the manifest ---------------------------------------------------------------------------------

def is_store(directory: str | Path) -> bool:
    """Whether ``directory`` is an orbax checkpoint written by :func:`save`."""
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") == FORMAT and manifest.get("version") == 1:
        raise CheckpointError(f"{path}: a v1 store (matmul weights [in, out]); this step3-jax "
                              f"reads v{VERSION} ([out, in]): convert the Hub checkpoint again")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} manifest "
                              f"(format={manifest.get('format')!r}, "
                              f"version={manifest.get('version')!r})")
    if manifest.get("weights") not in STORAGE_DTYPES:
        raise CheckpointError(f"{path}: unknown stored weight dtype {manifest.get('weights')!r}")
    return manifest


# ----- writing --------------------------------------------------------------------------------------

class Writer:
    """Writes a store chunk by chunk into a temporary sibling directory; :meth:`commit` renames
    it into place, so an interrupted run leaves nothing loadable at the destination (and the
    next run starts clean). Use as a context manager: leaving it without commit removes the
    temporary directory. Each chunk is written a tensor at a time
    (:func:`streaming.save_lazy`); directories and files follow the umask."""

    def __init__(self, directory: str | Path, raw_config: dict, weights: str, *,
                 force: bool = False, extra: dict | None = None):
        if weights not in STORAGE_DTYPES:
            raise CheckpointError(f"unknown storage dtype {weights!r} "
                                  f"(expected one of {', '.join(STORAGE_DTYPES)})")
        self.final = Path(directory).expanduser().absolute()
        if self.final.exists() and not self.final.is_dir():
            raise CheckpointError(f"output {self.final} exists and is not a directory")
        if self.final.is_dir() and any(self.final.iterdir()) and not force:
            raise CheckpointError(f"output directory {self.final} is not empty "
                                  "(pass --force to replace it)")
        self.tmp = streaming.staging_dir(self.final)
        self.weights = weights
        self.manifest = {"format": FORMAT, "version": VERSION, "weights": weights,
                         "chunks": [], **(extra or {})}
        (self.tmp / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        with interrupts.deferred():  # the cleanup is not cut short by another Ctrl-C
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def write_chunk(self, name: str, chunk) -> None:
        """Save one chunk (a pytree of host or device arrays, or :class:`streaming.Lazy` leaves
        read as they are written) and wait until it is on disk. A Ctrl-C meanwhile is raised
        once the chunk is written: interrupting orbax mid-save leaves its threads writing into
        the directory the cleanup removes."""
        with interrupts.deferred():
            streaming.save_lazy(self.tmp / name, jax.tree.map(streaming.lazy, stored_state(chunk)))
        streaming.release_memory()
        self.manifest["chunks"].append(name)

    def copy_beside(self, source: Path) -> None:
        """Copy a side file (tokenizer, generation config) into the store; its mode follows the
        umask."""
        shutil.copyfile(source, self.tmp / source.name)

    def commit(self) -> Path:
        """Move the finished store into place (a Ctrl-C waits until it is there: between the
        two renames the old store is out of place and the new one not yet in)."""
        with interrupts.deferred():
            return self._commit()

    def _commit(self) -> Path:
        (self.tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        streaming.publish(self.tmp, self.final)
        return self.final


def refuse_fp8(cfg) -> None:
    """FP8 storage is Step-3's: the Step-3.5 layers take plain arrays, not FP8 nodes."""
    if family.is_step35(cfg):
        raise CheckpointError("fp8 storage is not available for Step-3.5 models (their layers "
                              "take plain arrays): store bfloat16 or float32; a block-FP8 Hub "
                              "checkpoint is dequantized on reading")


def quantize_params(params, cfg):
    """Every quantizable weight of ``params`` (canonical stacked layout) as a
    :class:`quant.Fp8Weight` (host arrays); the rest as bfloat16 host arrays."""
    refuse_fp8(cfg)
    params = family.of(cfg).weights.stack_experts(params)

    def one(spec, value):
        if isinstance(value, quant.Fp8Weight):
            return value
        host = np.asarray(value, np.float32)
        if quant.is_quantized(spec):
            return quant.quantize_leaf(host, spec)
        return host.astype(ml_dtypes.bfloat16)

    return jax.tree.map(one, declaration(cfg), params, is_leaf=is_spec)


def save(params, cfg: AnyConfig, directory: str | Path, *, weights: str | None = None,
         force: bool = False, progress: bool = True, raw_config: dict | None = None) -> Path:
    """Write ``params`` (any layout, any placement) as a store at ``directory``, atomically.

    ``weights``: the stored dtype (``bfloat16``, ``float32``; default the params' dtype). Each
    weight is gathered to the host, written and freed in turn. ``raw_config``: the Hub config to
    write beside (default: ``cfg``'s own fields, ``cfg.to_hub_dict()``).
    """
    weights = weights or str(jnp.dtype(cfg.dtype))
    params = family.of(cfg).weights.stack_experts(params)
    if weights == "fp8":
        params = quantize_params(params, cfg)
    raw = raw_config if raw_config is not None else cfg.to_hub_dict()
    names = chunk_names(cfg)
    decl = declaration(cfg)
    with Writer(directory, raw, weights, force=force) as w, \
            tqdm(names, desc="saving", unit="chunk", disable=not progress, leave=False) as bar:
        for name in bar:
            chunk = chunk_of(params, name)
            if weights != "fp8":  # each weight gathered and cast only when it is written
                chunk = jax.tree.map(
                    lambda spec, a: _cast_lazy(a, leaf_dtype(spec, weights)),
                    chunk_of(decl, name), chunk, is_leaf=is_spec)
            w.write_chunk(name, chunk)
        return w.commit()


def _cast_lazy(a, dtype) -> streaming.Lazy:
    return streaming.Lazy(a.shape, dtype, lambda: np.asarray(a).astype(dtype))


# ----- reading --------------------------------------------------------------------------------------

def _abstract_chunk(name: str, cfg: AnyConfig, weights: str, shardings, host: bool = False):
    """The restore target of one chunk: ShapeDtypeStructs in the stored structure, cast to the
    compute dtype, with their shardings (``host``: none, so orbax returns host NumPy arrays)."""
    specs = chunk_of(declaration(cfg), name)

    def target(spec, sharding):
        if weights == "fp8" and quant.is_quantized(spec):
            return quant.abstract_fp8(spec, sharding)
        return jax.ShapeDtypeStruct(spec.shape, leaf_dtype(spec, cfg.dtype), sharding=sharding)

    if shardings is None:  # without a target sharding orbax returns host NumPy arrays
        one = None if host else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: target(s, one), specs, is_leaf=is_spec)
    return jax.tree.map(target, specs, chunk_of(shardings, name), is_leaf=is_spec)


def _check_shapes(directory: Path, name: str, stored, target) -> None:
    def leaves(tree):
        return {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(tree)[0]}

    have, want = leaves(stored), leaves(stored_state(target))
    for key in sorted(set(have) | set(want)):
        if key not in have:
            raise CheckpointError(f"{directory / name}: missing array {name}{key}")
        if key not in want:
            raise CheckpointError(f"{directory / name}: unexpected array {name}{key}")
        if want[key] is _PLACEHOLDER:  # not restored by this process
            continue
        if tuple(have[key].shape) != tuple(want[key].shape):
            raise CheckpointError(f"{directory / name}: array {name}{key}: expected shape "
                                  f"{list(want[key].shape)}, got {list(have[key].shape)}")


def _multiprocessing(processes):
    """orbax's options for a restore run by ``processes`` only (the processes holding the target
    devices; in a multi-process AFD run each group restores its own part, not in lockstep with
    the other group); None: orbax's default, every process."""
    import orbax.checkpoint as ocp

    if processes is None:
        return ocp.options.MultiprocessingOptions()
    processes = sorted(processes)
    return ocp.options.MultiprocessingOptions(
        primary_host=processes[0], active_processes=set(processes),
        barrier_sync_key_prefix="step3_jax_" + "_".join(map(str, processes)))


def holding_processes(shardings, keep=None):
    """The processes whose devices hold the (kept) weights of ``shardings``, or None in a
    single-process run."""
    if shardings is None or jax.process_count() == 1:
        return None
    flat = jax.tree.leaves(shardings)
    flags = jax.tree.leaves(keep) if keep is not None else [True] * len(flat)
    return frozenset(d.process_index for s, k in zip(flat, flags) if k for d in s.device_set)


class Reader:
    """The chunks of a store, restored one at a time (a context manager). ``processes``: the
    processes that restore together (:func:`holding_processes`; default all)."""

    def __init__(self, directory: str | Path, cfg: AnyConfig, processes=None):
        import orbax.checkpoint as ocp

        self.directory = Path(directory)
        self.cfg = cfg
        self.manifest = read_manifest(self.directory)
        if self.manifest["weights"] == "fp8":
            refuse_fp8(cfg)
        names = chunk_names(cfg)
        if self.manifest["chunks"] != names:
            missing = [n for n in names if n not in self.manifest["chunks"]]
            raise CheckpointError(f"{self.directory / MANIFEST}: chunks do not match config.json "
                                  f"({'missing ' + missing[0] if missing else 'unexpected chunks'})")
        self.names = names
        self._options = _multiprocessing(processes)
        self._ckpt = ocp.StandardCheckpointer(multiprocessing_options=self._options)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._ckpt.close()
        return False

    def read(self, name: str, shardings=None, keep=None):
        """Chunk ``name`` restored onto ``shardings`` (a params-shaped tree, or None for the
        default device), in ``cfg.dtype``; FP8 weights as :class:`quant.Fp8Weight`. ``keep``: a
        params-shaped tree of bools; weights marked False are not read (orbax's partial restore)
        and come back as None."""
        return self._read(name, shardings, None if keep is None else chunk_of(keep, name))

    def leaves(self, name: str):
        """The weights of chunk ``name`` one at a time, as ``(spec, value)`` in declaration
        order (a host array, or an FP8 weight of host arrays), restored a few at a time
        (``streaming.batches``; orbax's partial restore): a caller that writes each before
        asking for the next holds about one large weight."""
        specs, treedef = jax.tree.flatten(chunk_of(declaration(self.cfg), name), is_leaf=is_spec)
        itemsize = jnp.dtype(self.cfg.dtype).itemsize
        for group in streaming.batches([math.prod(s.shape) * itemsize for s in specs]):
            keep = treedef.unflatten([i in group for i in range(len(specs))])
            values = treedef.flatten_up_to(self._read(name, None, keep, host=True))
            for i in group:
                yield specs[i], values[i]
                values[i] = None

    def _read(self, name: str, shardings, chunk_keep, host: bool = False):
        path = self.directory / name
        if not path.is_dir():
            raise CheckpointError(f"{path}: missing chunk directory")
        target = _abstract_chunk(name, self.cfg, self.manifest["weights"], shardings, host)
        if chunk_keep is not None:
            target = jax.tree.map(
                lambda k, t: t if k else jax.tree.map(lambda _: _PLACEHOLDER, t),
                chunk_keep, target)
        try:
            stored = self._ckpt.metadata(path).item_metadata.tree
        except Exception as e:  # orbax raises assorted types for a damaged directory
            raise CheckpointError(f"{path}: unreadable orbax checkpoint ({e})") from None
        _check_shapes(self.directory, name, stored, target)
        try:
            if chunk_keep is not None and not all(jax.tree.leaves(chunk_keep)):
                state = _restore_subset(path, stored_state(target), self._options)
            else:
                state = self._ckpt.restore(path, stored_state(target))
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(f"{path}: cannot restore ({type(e).__name__}: {first})") \
                from None
        if name.startswith("layer_"):
            value = serialization.from_state_dict(target, state)
        else:
            value = {key: state.get(key) for key in chunk_of(declaration(self.cfg), name)}
        if chunk_keep is not None:
            value = jax.tree.map(lambda k, v: v if k else None, chunk_keep, value)
        return value


def _prune(state: dict) -> dict:
    """``state`` without its placeholder leaves (and the dicts left empty)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            v = _prune(v)
            if v:
                out[k] = v
        elif v is not _PLACEHOLDER:
            out[k] = v
    return out


def _fill(template: dict, restored: dict) -> dict:
    """``template``'s structure with the restored arrays, None at its placeholders."""
    return {k: _fill(v, restored.get(k, {})) if isinstance(v, dict)
            else None if v is _PLACEHOLDER else restored[k] for k, v in template.items()}


def _restore_subset(path: Path, target: dict, options) -> dict:
    """Restore only the non-placeholder leaves of a chunk's state-dict ``target``: orbax's
    partial restore (``PyTreeRestore(partial_restore=True)``) never reads the arrays left out."""
    import orbax.checkpoint as ocp

    subset = _prune(target)
    handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=options)
    with ocp.Checkpointer(handler, multiprocessing_options=options) as ckpt:
        restored = ckpt.restore(path, args=ocp.args.PyTreeRestore(
            item=subset, restore_args=ocp.checkpoint_utils.construct_restore_args(subset),
            partial_restore=True))
    return _fill(target, restored)


def restore(directory: str | Path, cfg: AnyConfig, shardings=None, *, progress: bool = True,
            layout=None, keep=None):
    """Restore a store chunk by chunk onto ``shardings`` (default: the default device), in
    ``cfg.dtype`` (FP8 stores keep their quantized nodes). ``layout``: a function applied to
    each restored layer before the next one loads (e.g. to the CPU loop kernel's per-expert
    layout), so a layout change never holds two copies of the model. ``keep``: a params-shaped
    tree of bools; weights marked False are not read and come back as None (a chunk with none
    kept is not opened).
    """
    chunks = {}
    with Reader(directory, cfg, holding_processes(shardings, keep)) as reader:
        for name in tqdm(reader.names, desc="restoring", unit="chunk", disable=not progress,
                         leave=False):
            if keep is not None and not any(jax.tree.leaves(chunk_of(keep, name))):
                chunks[name] = jax.tree.map(lambda _: None, chunk_of(keep, name))
                continue
            value = reader.read(name, shardings, keep)
            chunks[name] = layout(value) if layout is not None and name.startswith(
                "layer_") else value
    return assemble(cfg, chunks)


def stored_bytes(directory: str | Path) -> int:
    """Bytes on disk under ``directory``."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
