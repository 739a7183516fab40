"""A checkpoint's chunks, the unit of streaming for the orbax store and Hub export: the
embedding, each decoder layer, the head (final norm and LM head), for either model family (the
structure comes from ``family.of(cfg).weights.declare``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flax import serialization

from step3_jax.model import family

if TYPE_CHECKING:
    from step3_jax.model.step35_reader import AnyConfig


def declaration(cfg: AnyConfig):
    return family.of(cfg).weights.declare(cfg)


def chunk_names(cfg: AnyConfig) -> list[str]:
    return ["embed"] + [f"layer_{i:03d}" for i in range(cfg.num_hidden_layers)] + ["head"]


def chunk_of(tree, name: str):
    """The subtree of a params-shaped ``tree`` (values, specs or shardings) stored as ``name``."""
    if name == "embed":
        return {"embed": tree.embed}
    if name == "head":
        return {"final_norm": tree.final_norm, "lm_head": tree.lm_head}
    return tree.layers[int(name.split("_")[1])]


def assemble(cfg: AnyConfig, chunks: dict):
    """The params of ``cfg``'s family from the per-chunk values (the inverse of
    :func:`chunk_of`)."""
    return declaration(cfg).replace(
        embed=chunks["embed"]["embed"],
        layers=tuple(chunks[f"layer_{i:03d}"] for i in range(cfg.num_hidden_layers)),
        final_norm=chunks["head"]["final_norm"], lm_head=chunks["head"]["lm_head"])


def stored_state(chunk) -> dict:
    """A chunk as a nested dict of arrays (orbax's stored names); ``None`` leaves dropped."""
    state = serialization.to_state_dict(chunk)
    return {k: v for k, v in state.items() if v is not None} if isinstance(state, dict) else state
