"""Writing checkpoints a tensor at a time, into a staging directory that follows the umask.

Host memory while converting is set by the largest *tensor*, not the largest layer:

* **orbax** (:func:`save_lazy`): a chunk (one orbax checkpoint, e.g. a layer) is handed to orbax
  as :class:`Lazy` leaves — shape and dtype now, values read only when orbax writes that leaf —
  written a few at a time (up to :data:`BATCH_BYTES`; a large tensor alone) without orbax's
  defensive copy. The files are orbax's own (the ``np.ndarray`` type, the standard metadata), so
  any orbax reader restores them.
* **safetensors** (:class:`SafetensorsWriter`): the header is written first from the declared
  names, dtypes and shapes, then each tensor's bytes as it arrives.

The staging directory (:func:`staging_dir`) is a temporary sibling of the output that is renamed
into place when complete (:func:`publish`); ``tempfile`` creates it 0700, so it is given the
mode the umask gives any new directory, and an output that cannot be created or renamed is a
one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from step3_jax.errors import CheckpointError, Step3Error

# ----- orbax: a few leaves at a time --------------------------------------------------------------


class Lazy:
    """An array that is read only when it is written: ``shape`` and ``dtype`` up front (orbax
    plans the checkpoint from them), the values from ``load()``."""

    def __init__(self, shape, dtype, load):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self._load = load

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def load(self) -> np.ndarray:
        value = np.asarray(self._load())
        if value.shape != self.shape or value.dtype != self.dtype:
            raise AssertionError(f"declared {self.shape} {self.dtype}, "
                                 f"loaded {value.shape} {value.dtype}")
        return value


def lazy(value) -> Lazy:
    """``value`` (a host or device array, or already :class:`Lazy`) as a :class:`Lazy` leaf: a
    device array is copied to the host only when written."""
    return value if isinstance(value, Lazy) else Lazy(value.shape, value.dtype,
                                                       lambda: value)


def lazy_pair(make, first: tuple, second: tuple) -> tuple[Lazy, Lazy]:
    """Two :class:`Lazy` leaves computed together by ``make() -> (a, b)`` (an FP8 weight's values
    and scales): computed when either is first written, dropped once both have been.
    ``first``/``second``: their ``(shape, dtype)``."""
    cache: dict[int, np.ndarray] = {}

    def part(i: int):
        def load():
            if i not in cache:
                cache.update(enumerate(make()))
            return cache.pop(i)
        return load

    return Lazy(*first, part(0)), Lazy(*second, part(1))


# Leaves written together (concurrently) while their bytes stay under this: small weights in
# one go (a write costs ~30 ms of latency whatever its size), a large one alone.
BATCH_BYTES = 32 << 20


def batches(sizes: list[int], limit: int | None = None) -> list[list[int]]:
    """Consecutive groups of indices into ``sizes`` whose total stays within ``limit`` (default
    :data:`BATCH_BYTES`; a size over the limit alone in its group)."""
    limit = BATCH_BYTES if limit is None else limit
    groups: list[list[int]] = []
    total = limit + 1
    for i, size in enumerate(sizes):
        if total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _handler():
    """orbax's NumPy handler for :class:`Lazy` leaves, writing them a few at a time
    (:func:`batches`) instead of all at once, without a defensive copy. A batch is read whole
    before any of its writes starts; a :class:`Step3Error` from a read (a tensor that cannot be
    read) stops the writing and is kept in ``failure`` for :func:`save_lazy` to raise, rather
    than raised in orbax's writer thread (which would log it with a traceback)."""
    import orbax.checkpoint as ocp

    class FewAtATime(ocp.type_handlers.NumpyHandler):
        failure: Step3Error | None = None

        async def _background_serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            for group in batches([v.nbytes for v in values]):
                try:
                    arrays = [values[i].load() for i in group]
                except Step3Error as e:
                    self.failure = e
                    return
                await super()._background_serialize(arrays, [infos[i] for i in group],
                                                    [args[i] for i in group])
                del arrays

    return FewAtATime(deepcopy_host_arrays=False)


def save_lazy(path: Path, state) -> None:
    """Save ``state`` (a nested dict of :class:`Lazy` leaves) as one orbax checkpoint at ``path``,
    holding one batch of leaves (:func:`batches`) at a time. A :class:`Step3Error` raised by a
    leaf's ``load`` comes out as itself (what is at ``path`` then is incomplete: the caller
    discards it)."""
    import orbax.checkpoint as ocp

    handler = _handler()
    registry = ocp.type_handlers.create_type_handler_registry(  # jax.Array: never used; its
        (jax.Array, ocp.type_handlers.ArrayHandler()), (Lazy, handler))  # absence warns
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckpt:
        ckpt.save(path, args=ocp.args.PyTreeSave(state))
    if handler.failure is not None:
        raise handler.failure


def release_memory() -> None:
    """Hand freed heap memory back to the OS (the C library's ``malloc_trim``; a no-op where
    there is none). The tensor buffers that orbax's and tensorstore's writer threads free stay
    resident in their malloc arenas otherwise, and RSS creeps up chunk after chunk (measured:
    a 0.70 GB peak instead of 0.38 GB converting a 1 GB checkpoint, BENCHMARKS.md)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


# ----- safetensors: the header first, then one tensor at a time -----------------------------------

SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                      np.dtype(ml_dtypes.bfloat16): "BF16",
                      np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: ``tensors`` (name -> ``(shape, dtype)``, in
    file order) fixes the header; :meth:`write` appends each tensor's bytes in that order."""

    def __init__(self, path: Path, tensors: dict[str, tuple], metadata: dict | None = None):
        header, offset = {}, 0
        for name, (shape, dtype) in tensors.items():
            size = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._pending = list(tensors.items())
        self._file = open(path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        return False

    def write(self, name: str, value: np.ndarray) -> None:
        """The next tensor's bytes (it must be the next one declared, with its shape and dtype)."""
        want, (shape, dtype) = self._pending.pop(0)
        if (name, tuple(value.shape), value.dtype) != (want, tuple(shape), np.dtype(dtype)):
            raise AssertionError(f"expected {want} {list(shape)} {np.dtype(dtype)}, got {name} "
                                 f"{list(value.shape)} {value.dtype}")
        self._file.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)


# ----- the staging directory ----------------------------------------------------------------------

def umask() -> int:
    """The process umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _cannot_create(final: Path, error: OSError) -> CheckpointError:
    for parent in final.parents:
        if parent.exists():
            if not parent.is_dir():
                return CheckpointError(f"cannot create output directory {final}: {parent} is "
                                       "not a directory")
            break
    return CheckpointError(f"cannot create output directory {final} "
                           f"({error.strerror or error})")


def staging_dir(final: Path) -> Path:
    """A new temporary sibling of ``final`` (its parents created) with the mode the umask gives
    a new directory, or a one-line error naming ``final`` and the reason."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        os.chmod(tmp, 0o777 & ~umask())
    except OSError as e:
        raise _cannot_create(final, e) from None
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``, replacing what is there; a one-line error if the
    rename fails (the previous ``final`` kept, ``tmp`` left for the caller to remove)."""
    trash = None
    try:
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, trash)
        os.rename(tmp, final)
    except OSError as e:
        if trash is not None and trash.exists() and not final.exists():
            os.rename(trash, final)  # the previous output stays where it was
        raise CheckpointError(f"cannot move the finished output into place at {final} "
                              f"({e.strerror or e})") from None
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
