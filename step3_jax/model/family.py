"""The model families behind one interface: Step-3 (``step3_text``) and Step-3.5 (``step3p5``).

Code that serves either family (checkpoints, runtimes, the CLI) asks :func:`of` for the modules
that implement a config's family instead of testing config types itself:

- ``weights``: ``declare(cfg)``, ``is_spec``, ``init_params(cfg, seed)``, ``count_params(cfg)``,
  ``abstract_params(cfg)`` (:mod:`~step3_jax.model.weights` or
  :mod:`~step3_jax.model.step35_weights`);
- ``decoder``: ``forward(params, tokens, cache, cfg, num_new)``, ``prefill(params, tokens,
  lengths, capacity, cfg, chunk)``, ``extend``, ``logits_from_hidden``, and the cache's
  ``init_cache(cfg, batch, capacity, dtype)`` (:mod:`~step3_jax.model.decoder` with
  :mod:`~step3_jax.model.cache`, or :mod:`~step3_jax.model.step35`).

Imports are deferred so that importing this module costs nothing for the family not used.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

STEP3 = "step3"
STEP35 = "step3p5"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str           # STEP3 or STEP35
    label: str          # for messages: "Step-3", "Step-3.5"
    _weights: str
    _decoder: str

    @property
    def weights(self) -> ModuleType:
        return importlib.import_module(self._weights)

    @property
    def decoder(self) -> ModuleType:
        return importlib.import_module(self._decoder)


_FAMILIES = {
    STEP3: Family(STEP3, "Step-3", "step3_jax.model.weights", "step3_jax.model.decoder"),
    STEP35: Family(STEP35, "Step-3.5", "step3_jax.model.step35_weights", "step3_jax.model.step35"),
}


def name_of(cfg) -> str:
    """``STEP35`` for a :class:`~step3_jax.model.step35_config.Step35Config`, else ``STEP3``."""
    from step3_jax.model.step35_config import Step35Config
    return STEP35 if isinstance(cfg, Step35Config) else STEP3


def of(cfg) -> Family:
    """The family implementing ``cfg``."""
    return _FAMILIES[name_of(cfg)]


def is_step35(cfg) -> bool:
    return name_of(cfg) == STEP35
