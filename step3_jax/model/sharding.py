"""Meshes and the one rules table from logical axes to mesh axes.

Layer code never names a mesh axis: weights carry logical axes (``declare`` of either family,
through :mod:`step3_jax.model.family`), the KV cache and activations too (``cache.K_AXES``,
``cache.V_AXES``; Step-3.5's :data:`STEP35_CACHE_AXES`), and :data:`DEFAULT_RULES` says which
mesh axis each logical axis is split over. Mesh axes are named after the paper's device groups:
``dp`` (data-parallel attention instances), ``tp`` (tensor parallel), ``ep`` (expert parallel).
A rule whose mesh axis is absent from the mesh, or of size 1, simply replicates.

Step-3.5 (GQA) splits its query heads *and* its K/V heads over ``tp``. Query head ``h`` of a
layer with ``n`` query heads reads K/V head ``h // (n / G)``. When ``tp`` divides ``G`` (and so
``n``, a multiple of ``G``), device ``j`` holds query heads ``j·n/tp … (j+1)·n/tp - 1`` and K/V
heads ``j·G/tp … (j+1)·G/tp - 1``, and every query head it holds reads a K/V head it holds:
``(j·n/tp) // (n/G) = j·G/tp`` and ``((j+1)·n/tp - 1) // (n/G) = (j+1)·G/tp - 1`` because
``n/tp`` is a whole number of groups of ``n/G``. So attention needs no collective until
``o_proj`` sums over heads. :func:`check_mesh` requires ``tp | G`` (and ``ep | experts``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from step3_jax.errors import Step3Error
from step3_jax.model import family
from step3_jax.model.weights import is_spec

MESH_AXES = ("dp", "tp", "ep")

# Logical axis -> mesh axis (or None: replicated). Edited for a new parallelism, never layer code.
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "dp",
    "vocab": "tp",
    "embed": None,
    "q_lora": None,      # inter_norm's RMS spans the whole low-rank query: keep it whole
    "heads": "tp",
    "kv_heads": "tp",    # Step-3.5's GQA K/V heads, split like the query heads they serve
    "head_dim": None,
    "mlp": "tp",
    "shared_mlp": "tp",
    "experts": "ep",
    "expert_mlp": "tp",
    "cache_len": None,
    "seq": None,
}

# Logical axes of one Step-3.5 layer's K and V cache arrays ``[B, S_i, G, d]``.
STEP35_CACHE_AXES = ("batch", "cache_len", "kv_heads", "head_dim")


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


def check_mesh(cfg, mesh, rules=DEFAULT_RULES) -> None:
    """One-line errors, before any work, for a mesh that cannot split ``cfg`` (Step-3.5): the
    mesh axis of ``kv_heads`` must divide the K/V heads (then it also divides every layer's
    query heads, multiples of them, and the q and K/V blocks line up; module docstring), and
    the mesh axis of ``experts`` the routed experts. Other splits (widths, the vocabulary) are
    checked weight by weight in :func:`param_shardings`. ``mesh``: a Mesh or AbstractMesh."""
    if not family.is_step35(cfg):
        return
    checks = [("kv_heads", cfg.num_attention_groups,
               "K/V heads (num_attention_groups; query head h reads K/V head h // (n/G))")]
    for n in sorted(set(cfg.attention_heads)):
        checks.append(("heads", n, "query heads of a layer"))
    if cfg.moe_layers:
        checks.append(("experts", cfg.moe_num_experts, "routed experts (moe_num_experts)"))
    for logical, size, what in checks:
        axis = rules.get(logical)
        split = mesh.shape.get(axis, 1) if axis else 1
        if split > 1 and size % split:
            raise Step3Error(f"mesh {axis}={split} does not divide the {size} {what} of config "
                             f"{cfg.name!r}")


def param_shardings(cfg, mesh: Mesh, rules=DEFAULT_RULES):
    """A NamedSharding for every weight, derived from the declaration's logical axes (either
    family: ``family.of(cfg).weights.declare``).

    Every split dimension must divide evenly: otherwise a one-line error names the weight, the
    axis and the mesh axis (e.g. 8 experts over ``ep=3``); a Step-3.5 mesh is first checked as
    a whole by :func:`check_mesh`.
    """
    check_mesh(cfg, mesh, rules)

    def one(spec):
        sharding = named(mesh, spec.axes, rules)
        for size, logical, mesh_axis in zip(spec.shape, spec.axes, sharding.spec):
            if mesh_axis is not None and size % mesh.shape[mesh_axis]:
                raise Step3Error(f"mesh {mesh_axis}={mesh.shape[mesh_axis]} does not divide the "
                                 f"{logical} axis ({size}) of {spec.hub}")
        return sharding

    return jax.tree.map(one, family.of(cfg).weights.declare(cfg), is_leaf=is_spec)


def cache_shardings(cfg, mesh: Mesh, capacity: int, rules=DEFAULT_RULES):
    """The KV cache's placement, a cache-shaped tree of NamedShardings: Step-3's ``KVCache``
    (``cache.K_AXES``/``V_AXES``: split by batch) or Step-3.5's ``Step35Cache`` of ``capacity``
    positions (its static field; per layer :data:`STEP35_CACHE_AXES`: split by batch over
    ``dp`` and K/V heads over ``tp``); the lengths by batch. The cache's batch must be a
    multiple of ``dp``."""
    check_mesh(cfg, mesh, rules)
    L, per_seq = cfg.num_hidden_layers, named(mesh, ("batch",), rules)
    if family.is_step35(cfg):
        kv = (named(mesh, STEP35_CACHE_AXES, rules),) * L
        return family.of(cfg).decoder.Step35Cache(k=kv, v=kv, lengths=per_seq,
                                                   capacity=capacity)
    from step3_jax.model.cache import K_AXES, V_AXES, KVCache
    return KVCache(k=(named(mesh, K_AXES, rules),) * L, v=(named(mesh, V_AXES, rules),) * L,
                   lengths=per_seq)


def drop_first_axis(sharding):
    """The sharding of one slice ``w[e]`` of a stacked ``[E, ...]`` weight."""
    if not isinstance(sharding, NamedSharding):
        return sharding  # a single-device or replicated placement fits any slice
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
