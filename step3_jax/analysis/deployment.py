"""A deployment's placement and each device's shard of the weights (the inputs of the memory plan,
:mod:`step3_jax.analysis.plan`).

:class:`Placement` says where the model lives: one colocated ``dp x tp x ep`` mesh, or AFD's
attention and FFN groups. :func:`shards` lists every leaf of the weight declaration (Step-3's
``weights.declare`` or Step-3.5's ``step35_weights.declare``, through ``model.family``) at its
per-device shard shape on an abstract mesh of the planned size (the rules table,
``sharding.param_shardings``), with the group that holds it, and :func:`weight_bytes` prices a
list of shards in a weights format (``fp8``, ``bf16``, ``float32``). A weight declared with a
fixed dtype (Step-3.5's float32 ``router_bias``) keeps it in every format.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax

from step3_jax.errors import Step3Error
from step3_jax.model import family, quant, weights
from step3_jax.model.config import Step3Config
from step3_jax.model.sharding import MESH_AXES, axis_sizes

BYTES = {"fp8": 1, "bf16": 2, "float32": 4}
GPUS_PER_SERVER = 8  # the paper's servers: 2A2F = 16 attention + 16 FFN devices
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# ----- inputs -------------------------------------------------------------------------------------

def parse_bytes(text: str, flag: str = "--device-memory") -> int:
    """``"80GB"`` -> 80e9, ``"80GiB"`` -> 80 * 2**30, ``"1e9"`` -> 1e9 bytes (SI or binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]i?[bB]|[bB])?\s*",
                     str(text))
    if not m or float(m.group(1)) <= 0:
        raise Step3Error(f"{flag} must be a positive size like 80GB, 80GiB or 85899345920, "
                         f"got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the model lives: one colocated mesh, or AFD's attention and FFN groups."""

    dp: int = 1                 # colocated mesh (ignored under AFD)
    tp: int = 1
    ep: int = 1
    afd: bool = False
    attention: int = 0          # AFD: attention devices (data-parallel)
    ffn_ep: int = 1             # AFD: FFN devices = ffn_ep * ffn_tp
    ffn_tp: int = 1
    micro_batches: int = 1

    @property
    def devices(self) -> int:
        if self.afd:
            return self.attention + self.ffn_ep * self.ffn_tp
        return self.dp * self.tp * self.ep

    def describe(self) -> str:
        if not self.afd:
            return f"colocated mesh dp={self.dp},tp={self.tp},ep={self.ep}"
        f = self.ffn_ep * self.ffn_tp
        servers = (f" ({self.attention // GPUS_PER_SERVER}A{f // GPUS_PER_SERVER}F)"
                   if self.attention % GPUS_PER_SERVER == 0 and f % GPUS_PER_SERVER == 0 else "")
        return (f"AFD {self.attention}:{f}{servers}: {self.attention} attention devices "
                f"(data-parallel) + {f} FFN devices (ep={self.ffn_ep}, tp={self.ffn_tp}), "
                f"{self.micro_batches} micro-batches")

    def to_json(self) -> dict:
        if self.afd:
            return {"kind": "afd", "attention_devices": self.attention,
                    "ffn_devices": self.ffn_ep * self.ffn_tp, "ffn_mesh": {"ep": self.ffn_ep,
                                                                       "tp": self.ffn_tp},
                    "micro_batches": self.micro_batches}
        return {"kind": "colocated", "mesh": {"dp": self.dp, "tp": self.tp, "ep": self.ep}}


def parse_placement(afd: str | None = None, mesh: str | None = None, ffn_mesh: str | None = None,
                    micro_batches: int = 3) -> Placement:
    """``--afd A:F`` (devices, as ``generate --afd``; or the paper's ``2A2F``, servers of 8) or
    ``--mesh dp=N,tp=N,ep=N``; neither: one device. A mesh bigger than this machine is fine:
    the plan is for a cluster."""
    if afd and mesh:
        raise Step3Error("--afd and --mesh are exclusive (use --ffn-mesh for the FFN group)")
    if ffn_mesh and not afd:
        raise Step3Error("--ffn-mesh needs --afd")
    if not afd:
        return Placement(**axis_sizes(mesh))
    servers = re.fullmatch(r"\s*(\d+)\s*[aA]\s*(\d+)\s*[fF]\s*", afd)
    if servers:
        afd = f"{int(servers.group(1)) * GPUS_PER_SERVER}:{int(servers.group(2)) * GPUS_PER_SERVER}"
    from step3_jax.runtime.afd import parse_plan

    p = parse_plan(afd, ffn_mesh, micro_batches)
    return Placement(afd=True, attention=p.attention, ffn_ep=p.ffn_ep, ffn_tp=p.ffn_tp,
                     micro_batches=p.micro_batches)

# ----- per-device shards of the declaration -------------------------------------------------------

_NORMS = ("final_norm", "input_norm", "post_norm", "inter_norm", "q_norm", "k_norm")


def _category(keys: list, moe_layer: bool, step35: bool = False) -> str:
    """What a weight is, from its path in the declaration (Step-3.5's GQA projections are
    ``attention_projections``, Step-3's ``mfa_projections``; the router's bias is ``router``)."""
    name = keys[-1]
    if name in ("embed", "lm_head"):
        return {"embed": "embedding", "lm_head": "lm_head"}[name]
    if name in _NORMS:
        return "norms"
    if "attn" in keys:
        return "attention_projections" if step35 else "mfa_projections"
    if name in ("router", "router_bias"):
        return "router"
    if "shared" in keys:
        return "shared_expert"
    return "routed_experts" if moe_layer else "dense_ffn"


@dataclasses.dataclass(frozen=True)
class Shard:
    """One weight on one device of its group."""

    group: str           # "attention" or "ffn" (AFD) / "colocated"
    category: str        # embedding, lm_head, norms, mfa_projections, router, routed_experts, ...
    layer: int | None
    spec: weights.WeightSpec
    sharding: jax.sharding.NamedSharding | None  # None: held whole (AFD attention group)

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-device shard shape."""
        if self.sharding is None:
            return self.spec.shape
        return tuple(self.sharding.shard_shape(self.spec.shape))

    def bytes(self, fmt: str) -> tuple[int, int]:
        """``(value bytes, FP8 scale bytes)`` of this shard under weight format ``fmt``. FP8:
        the weights ``quant.is_quantized`` names (the Hub FP8 checkpoint's rule) at 1 byte, with
        their float32 block scales sharded by ``quant.scale_sharding``; the rest BF16."""
        n = math.prod(self.shape)
        fixed = getattr(self.spec, "dtype", None)  # Step-3.5's float32 router bias
        if fixed:
            return n * BYTES[fixed], 0
        if fmt != "fp8":
            return n * BYTES[fmt], 0
        if not quant.is_quantized(self.spec):
            return n * BYTES["bf16"], 0
        grid = quant.scale_grid(quant.matrix_view(self.spec))
        if self.sharding is not None:
            grid = quant.scale_sharding(self.spec, self.sharding).shard_shape(grid)
        return n, 4 * math.prod(grid)


def _abstract_mesh(dp=1, tp=1, ep=1):
    return jax.sharding.AbstractMesh((dp, tp, ep), MESH_AXES)


@functools.lru_cache(maxsize=16)
def shards(cfg: Step3Config, placement: Placement) -> tuple[Shard, ...]:
    """Every weight's per-device shard under ``placement`` (derived from the declaration and the
    rules table; a split that does not divide its axis is a one-line error)."""
    from step3_jax.model.sharding import param_shardings

    fam = family.of(cfg)
    decl = fam.weights.declare(cfg)
    if placement.afd:
        ffn_sh = param_shardings(cfg, _abstract_mesh(tp=placement.ffn_tp, ep=placement.ffn_ep))
        colo_sh = None
    else:
        colo_sh = param_shardings(cfg, _abstract_mesh(placement.dp, placement.tp, placement.ep))
        ffn_sh = None
    flat_specs = jax.tree_util.tree_flatten_with_path(decl, is_leaf=fam.weights.is_spec)[0]
    flat_sh = jax.tree.leaves(colo_sh if colo_sh is not None else ffn_sh)
    out = []
    for (path, spec), sharding in zip(flat_specs, flat_sh):
        keys = [getattr(k, "name", getattr(k, "idx", None)) for k in path]
        layer = keys[keys.index("layers") + 1] if "layers" in keys else None
        category = _category(keys, layer is not None and cfg.is_moe(layer),
                             fam.name == family.STEP35)
        if placement.afd:
            on_ffn = category in ("routed_experts", "shared_expert", "dense_ffn")
            group = "ffn" if on_ffn else "attention"
            if not on_ffn:  # afd.place: the attention group holds its weights whole
                sharding = None
        else:
            group = "colocated"
        out.append(Shard(group, category, layer, spec, sharding))
    return tuple(out)


def weight_bytes(items, fmt: str) -> dict:
    """Bytes per category (and ``fp8_scales``, ``total``) of ``items`` under format ``fmt``."""
    out: dict[str, int] = {}
    scales = 0
    for s in items:
        values, sc = s.bytes(fmt)
        out[s.category] = out.get(s.category, 0) + values
        scales += sc
    if fmt == "fp8":
        out["fp8_scales"] = scales
    out["total"] = sum(out.values())
    return out
