"""step3-jax: Step-3 (MFA attention + MoE) as pure JAX functions over pytrees.

The public API:

* :func:`load` — a config plus weights (a Hub checkpoint directory, or seeded random weights).
* :func:`forward` — ``forward(params, tokens, cache, cfg) -> (logits, cache)``.
* :func:`generate` — batched ragged-prompt generation with a jitted on-device decode loop.
"""

from step3_jax.checkpoint.loader import load
from step3_jax.errors import CheckpointError, ConfigError, Step3Error
from step3_jax.model.cache import KVCache, init_cache
from step3_jax.model.config import Step3Config, load_config
from step3_jax.model.decoder import forward
from step3_jax.runtime.generate import GenerationResult, Generator, generate, score

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
