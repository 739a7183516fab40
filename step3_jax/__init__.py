"""step3-jax: Step-3 (MFA attention + MoE) as pure JAX functions over pytrees.

The public API:

* :func:`load` — a config plus weights (a Hub checkpoint directory, or seeded random weights).
* :func:`forward` — ``forward(params, tokens, cache, cfg) -> (logits, cache)``.
* :func:`generate` — batched ragged-prompt generation with a jitted on-device decode loop.
"""

from step3_jax.errors import CheckpointError, ConfigError, Step3Error

# The JAX-backed names, imported on first use (PEP 562): ``import step3_jax`` does not start JAX,
# so the CLI's --help, argument errors and Ctrl-C handling are ready at once.
_LAZY = {"load": "step3_jax.checkpoint.loader", "KVCache": "step3_jax.model.cache",
         "init_cache": "step3_jax.model.cache", "Step3Config": "step3_jax.model.config",
         "load_config": "step3_jax.model.config", "forward": "step3_jax.model.decoder",
         "GenerationResult": "step3_jax.runtime.generate",
         "Generator": "step3_jax.runtime.generate", "generate": "step3_jax.runtime.generate",
         "score": "step3_jax.runtime.generate"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'step3_jax' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Step3Config",
    "load_config",
    "load",
    "forward",
    "generate",
    "score",
    "GenerationResult",
    "Generator",
    "init_cache",
    "KVCache",
    "Step3Error",
    "ConfigError",
    "CheckpointError",
]
