"""Loading, as one pipeline that reads top to bottom:

    source -> host pytree -> runtime layout -> placement

1. **which model**: a checkpoint's ``config.json`` or a preset, with overrides; a config given
   beside a checkpoint must describe it (:func:`model_config`); either family (Step-3 or
   Step-3.5, ``step35_reader.load_any_config``), whose weights module
   (``family.of(cfg).weights``) every later stage asks for the declaration;
2. **targets**: where each weight goes: a mesh through the rules table
   (``sharding.param_shardings``), or an explicit tree of shardings (AFD's two groups);
3. **runtime layout**: whether the MoE kernel wants per-expert arrays, asked once of
   ``moe.per_expert_layout`` (:func:`per_expert`; Step-3.5 keeps its experts stacked);
4. **source**: a Hub directory read tensor by tensor (``hub.read_leaves``), each laid out and
   placed (:func:`place_leaf`) before the next is read; an orbax store restored layer by layer
   straight onto the targets (``store.restore``, the layout applied per layer); or seeded random
   weights created on the targets (``weights.init_params``; Step-3.5's
   ``step35_weights.init_params`` creates them on the default device, then they are moved).

No weight is ever whole on one device unless its target is, and host memory stays at about one
tensor (Hub) or one layer (orbax).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from step3_jax.checkpoint import hub, store
from step3_jax.errors import CheckpointError, ConfigError
from step3_jax.model import family
from step3_jax.model.moe import per_expert_layout
from step3_jax.model.sharding import check_mesh, drop_first_axis, param_shardings
from step3_jax.model.step35_reader import AnyConfig, load_any_config
from step3_jax.model.weights import (Moe, WeightSpec, init_params, unstack_experts,
                                     unstack_moe)


def checkpoint_dir(checkpoint: str | Path) -> Path:
    """``checkpoint`` as an existing directory (absolute: orbax reads only absolute paths), or a
    one-line error."""
    directory = Path(checkpoint).expanduser().absolute()
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory {directory} {what}")
    return directory


# Config fields (both families) that say how to run a model, not what its weights are.
_NOT_ARCHITECTURE = ("dtype", "moe_impl", "attention_impl", "name")


def model_config(checkpoint: str | Path | None = None, config: str | Path | None = None,
                 **overrides) -> AnyConfig:
    """Which model: ``config`` (a preset name or a ``config.json`` path), else the checkpoint's
    own ``config.json``, else the ``tiny`` preset, with ``overrides`` (``dtype``, ``moe_impl``,
    or architecture fields); a Step-3 or a Step-3.5 config by its ``model_type``. Beside a
    checkpoint the result must describe it: a config of the other family, or a config or an
    override that changes its architecture, is a one-line error naming what differs, raised
    before any tensor is read (it would surface as unknown or missing tensors)."""
    if checkpoint is None:
        return load_any_config(config if config is not None else "tiny", **overrides)
    directory = checkpoint_dir(checkpoint)
    cfg = load_any_config(config if config is not None else directory, **overrides)
    own = load_any_config(directory)
    if family.name_of(cfg) != family.name_of(own):
        raise ConfigError(f"config {str(config)!r} is a {family.of(cfg).label} model, the "
                          f"checkpoint {directory} a {family.of(own).label} one; without "
                          "--config the checkpoint's own config.json is used")
    differ = [f.name for f in dataclasses.fields(cfg) if f.name not in _NOT_ARCHITECTURE
              and getattr(cfg, f.name) != getattr(own, f.name)]
    if differ:
        what = (f"config {str(config)!r}" if config is not None else
                "overrides " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()
                                         if k in differ))
        shown = ", ".join(f"{name} {getattr(cfg, name)!r} (checkpoint: {getattr(own, name)!r})"
                          for name in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ConfigError(f"{what} does not match the checkpoint {directory}: {shown}{more}; "
                          "without --config the checkpoint's own config.json is used")
    return cfg


def load_tokenizer(directory: str | Path | None):
    """The ``tokenizers.Tokenizer`` in ``directory/tokenizer.json``, or None if there is none."""
    if directory is None:
        return None
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer  # deferred: only text prompts need it

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises a bare Exception on parse errors
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None


def per_expert(cfg: AnyConfig, expert_parallel: int = 1) -> bool:
    """Whether ``cfg``'s weights run in the per-expert layout: ``moe.per_expert_layout`` for
    Step-3; never for Step-3.5, whose MoE reads the stacked ``[E, ...]`` experts."""
    return not family.is_step35(cfg) and per_expert_layout(cfg, expert_parallel)


def runtime_layout(params, cfg: AnyConfig, expert_parallel: int = 1):
    """``params`` in the layout :func:`per_expert` picks (``weights.unstack_experts``)."""
    return unstack_experts(params) if per_expert(cfg, expert_parallel) else params


def _is_expert_stack(spec: WeightSpec) -> bool:
    return spec.axes[0] == "experts" and len(spec.shape) == 3


def place_leaf(spec: WeightSpec, host, target, per_expert: bool):
    """Layout and placement of one host weight: a stacked expert weight becomes one array per
    expert when ``per_expert`` (each on the stacked target minus its expert axis), so the model
    is never held in both layouts; placed on ``target`` (None: the default device)."""
    if per_expert and _is_expert_stack(spec):
        one = None if target is None else drop_first_axis(target)
        return tuple(jnp.asarray(w) if one is None else jax.device_put(w, one) for w in host)
    return jnp.asarray(host) if target is None else jax.device_put(host, target)


def _from_hub(directory: Path, cfg: AnyConfig, targets, per_expert: bool, keep,
              progress: bool):
    specs, treedef = hub.specs_of(cfg)
    flat_targets = (treedef.flatten_up_to(targets) if targets is not None
                    else [None] * len(specs))
    leaves = hub.read_leaves(directory, cfg, keep, progress)
    return treedef.unflatten([None if host is None else place_leaf(spec, host, target, per_expert)
                              for spec, target, host in zip(specs, flat_targets, leaves)])


def _per_expert_layer(layer):
    return layer.replace(ffn=unstack_moe(layer.ffn)) if isinstance(layer.ffn, Moe) else layer


def _random(cfg: AnyConfig, seed: int, targets, keep):
    if family.is_step35(cfg):  # made on the default device (chunked draws), then placed
        params = family.of(cfg).weights.init_params(cfg, seed)
        if keep is not None:
            params = jax.tree.map(lambda k, v: v if k else None, keep, params)
        return params if targets is None else jax.device_put(params, targets)
    if keep is None and targets is not None and len(
            {frozenset(s.device_set) for s in jax.tree.leaves(targets)}) > 1:
        # AFD's two groups: one jit cannot produce both; create, then move
        return jax.device_put(init_params(cfg, seed), targets)
    return init_params(cfg, seed, targets, keep)


def _mesh_targets(cfg: AnyConfig, mesh):
    """``sharding.param_shardings`` of ``cfg`` on ``mesh`` (the rules table), after the mesh's
    one-line divisibility checks (``sharding.check_mesh``: K/V heads, experts)."""
    check_mesh(cfg, mesh)
    return param_shardings(cfg, mesh)


def load(checkpoint: str | Path | None = None, config: str | Path | None = None, *,
         dtype: str = "float32", seed: int = 0, mesh=None, shardings=None,
         expert_parallel: int | None = None, progress: bool = True, keep=None,
         **config_overrides) -> tuple[object, AnyConfig]:
    """A config and its weights (``weights.Params`` for Step-3, ``step35_weights.Params35`` for
    Step-3.5): from a checkpoint directory, or seeded random weights.

    ``checkpoint``: a Hub directory (``config.json`` + safetensors, bf16/fp16/f32 or block FP8,
    dequantized) or an orbax directory written by ``step3-jax convert``
    (:mod:`step3_jax.checkpoint.store`, detected by its manifest; an FP8 store keeps its
    quantized weights). Without it, ``config`` (a preset name like ``"tiny"`` or a
    ``config.json`` path; default ``"tiny"``) with random weights drawn from ``seed``.
    Placement: ``mesh`` (``sharding.parse_mesh``) places each weight by the rules table
    (``sharding.param_shardings``); ``shardings`` gives a params-shaped tree of shardings
    directly (AFD: ``afd.afd_shardings``), with ``expert_parallel`` the number of devices the
    experts are split over. Default: one device. Every weight is read straight onto its target
    sharding, never whole on one device. The weights come back in the MoE kernel's layout
    (:func:`runtime_layout`). ``keep``: a params-shaped tree of bools (``declare``'s structure);
    weights marked False are neither read nor created and come back as None (a process of a
    multi-process AFD run loads only what its devices hold).
    """
    if mesh is not None and shardings is not None:
        raise ValueError("give mesh or shardings, not both")
    directory = None if checkpoint is None else checkpoint_dir(checkpoint)
    cfg = model_config(directory, config, dtype=dtype, **config_overrides)
    targets = _mesh_targets(cfg, mesh) if mesh is not None else shardings
    ep = expert_parallel or (1 if mesh is None else mesh.shape.get("ep", 1))
    unstacked = per_expert(cfg, ep)
    if directory is not None and store.is_store(directory):
        params = store.restore(directory, cfg, targets, progress=progress, keep=keep,
                               layout=_per_expert_layer if unstacked else None)
    elif directory is not None:
        params = _from_hub(directory, cfg, targets, unstacked, keep, progress)
    else:
        params = _random(cfg, seed, targets, keep)
        params = unstack_experts(params) if unstacked else params
    return jax.block_until_ready(params), cfg
