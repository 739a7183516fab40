"""Meshes and the one rules table from logical axes to mesh axes.

Layer code never names a mesh axis: weights carry logical axes (``weights.declare``), the KV cache
and activations too (``cache.K_AXES``, ``cache.V_AXES``), and :data:`DEFAULT_RULES` says which
mesh axis each logical axis is split over. Mesh axes are named after the paper's device groups: ``dp`` (data-
parallel attention instances), ``tp`` (tensor parallel), ``ep`` (expert parallel). A rule whose
mesh axis is absent from the mesh, or of size 1, simply replicates.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from step3_jax.errors import Step3Error
from step3_jax.model.weights import declare, is_spec

MESH_AXES = ("dp", "tp", "ep")

# Logical axis -> mesh axis (or None: replicated). Edited for a new parallelism, never layer code.
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "dp",
    "vocab": "tp",
    "embed": None,
    "q_lora": None,      # inter_norm's RMS spans the whole low-rank query: keep it whole
    "heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "shared_mlp": "tp",
    "experts": "ep",
    "expert_mlp": "tp",
    "cache_len": None,
    "seq": None,
}


def make_mesh(dp: int = 1, tp: int = 1, ep: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``(dp, tp, ep)`` mesh over the first ``dp*tp*ep`` devices, with Auto (pjit-style) axes."""
    devices = list(jax.devices() if devices is None else devices)
    need = dp * tp * ep
    if need > len(devices):
        raise Step3Error(f"mesh dp={dp},tp={tp},ep={ep} needs {need} devices, "
                         f"only {len(devices)} available")
    grid = np.array(devices[:need], dtype=object).reshape(dp, tp, ep)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def axis_sizes(text: str | None, axes: Sequence[str] = MESH_AXES,
               flag: str = "--mesh") -> dict[str, int]:
    """``"dp=2,tp=2"`` -> ``{"dp": 2, "tp": 2, "ep": 1}`` over ``axes`` (omitted axes are 1)."""
    sizes = dict.fromkeys(axes, 1)
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in sizes:
            raise Step3Error(f"{flag}: unknown axis {name!r} (axes: {', '.join(axes)})")
        if not value.isdigit() or int(value) < 1:
            raise Step3Error(f"{flag}: {name} must be a positive integer, got {value!r}")
        sizes[name] = int(value)
    return sizes


def parse_mesh(text: str | None, devices: Sequence | None = None) -> Mesh:
    """A mesh from ``"dp=2,tp=2,ep=2"`` (axes omitted are 1; ``None`` or ``""``: one device)."""
    return make_mesh(**axis_sizes(text), devices=devices)


def logical_to_spec(axes: Sequence[str], mesh: Mesh,
                    rules: Mapping[str, str | None] = DEFAULT_RULES) -> P:
    """PartitionSpec for logical ``axes``; a mesh axis used twice in one spec is an error."""
    out, used = [], set()
    for axis in axes:
        if axis not in rules:
            raise Step3Error(f"no sharding rule for logical axis {axis!r}")
        mesh_axis = rules[axis]
        if mesh_axis is None or mesh_axis not in mesh.shape or mesh.shape[mesh_axis] == 1:
            out.append(None)
            continue
        if mesh_axis in used:
            raise Step3Error(f"sharding rules map two axes of {tuple(axes)} onto mesh axis "
                             f"{mesh_axis!r}")
        used.add(mesh_axis)
        out.append(mesh_axis)
    return P(*out)


def named(mesh: Mesh, axes: Sequence[str], rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules))


def param_shardings(cfg, mesh: Mesh, rules=DEFAULT_RULES):
    """A NamedSharding for every weight, derived from the declaration's logical axes.

    Every split dimension must divide evenly: otherwise a one-line error names the weight, the
    axis and the mesh axis (e.g. 8 experts over ``ep=3``).
    """
    def one(spec):
        sharding = named(mesh, spec.axes, rules)
        for size, logical, mesh_axis in zip(spec.shape, spec.axes, sharding.spec):
            if mesh_axis is not None and size % mesh.shape[mesh_axis]:
                raise Step3Error(f"mesh {mesh_axis}={mesh.shape[mesh_axis]} does not divide the "
                                 f"{logical} axis ({size}) of {spec.hub}")
        return sharding

    return jax.tree.map(one, declare(cfg), is_leaf=is_spec)


def drop_first_axis(sharding):
    """The sharding of one slice ``w[e]`` of a stacked ``[E, ...]`` weight."""
    if not isinstance(sharding, NamedSharding):
        return sharding  # a single-device or replicated placement fits any slice
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
