"""Block-FP8 weights: the quantized pytree node, its dequantization, and (de)quantizing checkpoints.

Step-3's FP8 checkpoint (``shared/spec/model.md`` §3) stores each quantized Linear as e4m3 values
plus one float32 scale per 128×128 block of the torch ``[out, in]`` matrix
(``weight_scale_inv``, which despite its name *multiplies*: ``w = fp8 * scale``), with a leading
expert axis for stacked experts and ragged edge blocks. Embeddings, LM head, router and norms stay
BF16.

Here a quantized weight is an :class:`Fp8Weight`: the values in the weight's declared layout
(``weights.WeightSpec.shape``, e.g. ``wq [n, d, Q]``) and the scales over its *matrix view*, the
Hub matrix (``[..., out, in]``, scales ``[..., out/128, in/128]``): the declared layout is the Hub
layout reshaped, so a Hub tensor and its scales are taken as they are. :func:`materialize` is
the one place the model turns either form into an array for a matmul (``layers.linear`` and the
attention einsums call it), so layer code never branches on the dtype. On XLA:CPU the matmul
then runs on the dequantized float32 weight: FP8 saves memory and disk there, not time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from step3_jax.errors import CheckpointError

BLOCK = 128
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
# Kept in BF16 in the paper's FP8 deployment (and in the Hub FP8 checkpoint).
_UNQUANTIZED_SUFFIXES = (".moe.gate.weight", "lm_head.weight", "embed_tokens.weight")


@struct.dataclass
class Fp8Weight:
    """A block-FP8 matmul weight: ``values`` (e4m3, declared shape) and ``scales`` (float32,
    ``[*lead, ceil(rows/B), ceil(cols/B)]`` over the matrix view ``view = (*lead, rows, cols)``)."""

    values: jax.Array
    scales: jax.Array
    view: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self):
        return self.values.dtype

    def __getitem__(self, e: int) -> "Fp8Weight":
        """Expert ``e`` of a stacked ``[E, ...]`` weight (``weights.unstack_experts``)."""
        return Fp8Weight(self.values[e], self.scales[e], self.view[1:])


def is_fp8(w) -> bool:
    return isinstance(w, Fp8Weight)


def is_quantized(spec) -> bool:
    """Whether the weight ``spec`` declares is block-FP8 in an FP8 checkpoint: every matmul
    weight (2-D or more in the Hub) except the router, the embedding and the LM head."""
    return len(spec.hub_shape) >= 2 and not spec.hub.endswith(_UNQUANTIZED_SUFFIXES)


def matrix_view(spec) -> tuple[int, ...]:
    """The Hub shape ``[..., out, in]``: the matrix (stack) the scale blocks tile."""
    return tuple(spec.hub_shape)


def scale_grid(view: tuple[int, ...], block: int = BLOCK) -> tuple[int, ...]:
    return view[:-2] + (-(-view[-2] // block), -(-view[-1] // block))


def _expand(scales, rows: int, cols: int, xp):
    s = xp.repeat(xp.repeat(scales, BLOCK, axis=-2)[..., :rows, :], BLOCK, axis=-1)
    return s[..., :cols]


def dequantize(w: Fp8Weight, dtype=jnp.float32) -> jax.Array:
    """``values * scale`` per block, in ``dtype``, in the declared layout (traceable)."""
    rows, cols = w.view[-2], w.view[-1]
    v = w.values.astype(jnp.float32).reshape(w.view)
    return (v * _expand(w.scales, rows, cols, jnp)).astype(dtype).reshape(w.values.shape)


def materialize(w, dtype) -> jax.Array:
    """The matmul helper's view of a weight: a plain array as it is, an FP8 one dequantized."""
    return dequantize(w, dtype) if isinstance(w, Fp8Weight) else w


# ----- host-side (NumPy) conversion ---------------------------------------------------------------

def dequantize_np(values: np.ndarray, scales: np.ndarray, name: str = "tensor") -> np.ndarray:
    """A Hub FP8 tensor ``[..., out, in]`` times its ``weight_scale_inv`` ``[..., ceil(out/B),
    ceil(in/B)]`` per block, as float32 (edge blocks cover the ragged remainder)."""
    expected = scale_grid(values.shape)
    if tuple(scales.shape) != expected:
        raise CheckpointError(f"{name}_scale_inv: block grid {list(scales.shape)} does not match "
                              f"{name} {list(values.shape)} in {BLOCK}x{BLOCK} blocks (expected "
                              f"{list(expected)})")
    rows, cols = values.shape[-2:]
    if values.ndim > 2:  # matrix by matrix: the temporaries of one expert, not of the stack
        out = np.empty(values.shape, np.float32)
        for i in np.ndindex(*values.shape[:-2]):
            out[i] = dequantize_np(values[i], scales[i], name)
        return out
    return values.astype(np.float32) * _expand(scales.astype(np.float32), rows, cols, np)


def quantize_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block-quantize a matrix(-stack) ``[..., rows, cols]``: e4m3 values and float32 scales
    ``absmax / 448`` per block (an all-zero block gets scale 1)."""
    if w.ndim > 2:  # matrix by matrix: the temporaries of one expert, not of the stack
        values = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
        scales = np.empty(scale_grid(w.shape), np.float32)
        for i in np.ndindex(*w.shape[:-2]):
            values[i], scales[i] = quantize_np(w[i])
        return values, scales
    w = np.asarray(w, np.float32)
    rows, cols = w.shape[-2:]
    grid = scale_grid(w.shape)
    pad = [(0, 0)] * (w.ndim - 2) + [(0, grid[-2] * BLOCK - rows), (0, grid[-1] * BLOCK - cols)]
    blocks = np.pad(w, pad).reshape(*w.shape[:-2], grid[-2], BLOCK, grid[-1], BLOCK)
    amax = np.abs(blocks).max(axis=(-3, -1))
    scales = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    values = (w / _expand(scales, rows, cols, np)).astype(ml_dtypes.float8_e4m3fn)
    return values, scales


def from_hub(values: np.ndarray, scales: np.ndarray, spec) -> Fp8Weight:
    """A Hub FP8 tensor and its scales as the :class:`Fp8Weight` of ``spec`` (host arrays)."""
    return Fp8Weight(np.ascontiguousarray(values).reshape(spec.shape),
                     np.ascontiguousarray(scales), matrix_view(spec))


def quantize_leaf(w: np.ndarray, spec) -> Fp8Weight:
    """A weight in the declared layout, block-quantized over its matrix view."""
    view = matrix_view(spec)
    values, scales = quantize_np(np.asarray(w).reshape(view))
    return Fp8Weight(values.reshape(spec.shape), scales, view)


# ----- restore targets and shardings -------------------------------------------------------------

def _view_axes(shape: tuple[int, ...], view: tuple[int, ...]) -> list[int]:
    """For each matrix-view axis, the first declared axis merged into it (views only merge
    adjacent axes: ``wq [n, d, Q]`` -> ``[n*d, Q]``)."""
    firsts, i = [], 0
    for size in view:
        firsts.append(i)
        prod = shape[i]
        i += 1
        while prod < size:
            prod *= shape[i]
            i += 1
        if prod != size:
            raise ValueError(f"{view} is not a merge of adjacent axes of {shape}")
    return firsts


def scale_sharding(spec, sharding):
    """The scales' sharding: the values' mesh axis of the first declared axis in each view axis."""
    from jax.sharding import NamedSharding, PartitionSpec

    if not isinstance(sharding, NamedSharding):
        return sharding
    parts = tuple(sharding.spec) + (None,) * (len(spec.shape) - len(sharding.spec))
    view = matrix_view(spec)
    grid = scale_grid(view)
    axes = []
    for dim, first in zip(grid, _view_axes(spec.shape, view)):
        name = parts[first]
        size = math.prod(sharding.mesh.shape[a] for a in (name if isinstance(name, tuple)
                                                          else (name,)) if a is not None)
        axes.append(name if size > 1 and dim % size == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*axes))


def abstract_fp8(spec, sharding=None) -> Fp8Weight:
    """The restore target of an FP8 weight: ShapeDtypeStructs for values and scales."""
    view = matrix_view(spec)
    return Fp8Weight(
        jax.ShapeDtypeStruct(spec.shape, FP8, sharding=sharding),
        jax.ShapeDtypeStruct(scale_grid(view), jnp.float32,
                             sharding=None if sharding is None else scale_sharding(spec, sharding)),
        view)
