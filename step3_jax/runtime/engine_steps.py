"""The engine's device programs over a paged KV cache, and the runner that owns the pool.

Two programs, both jitted with the page pool donated (updated in place):

* :func:`prefill_chunk` — one sequence's next ``chunk`` prompt tokens appended at its cached
  length, attending over its pages; samples a token from the chunk's last real position (the
  engine keeps it only when the chunk ends the prefix).
* :func:`decode_burst` — up to ``steps`` single-token decode steps for every slot in one
  ``lax.while_loop`` on the device (one host round trip per burst, not per token); it stops
  early as soon as any running row finishes (stop id or token budget), so the engine can hand
  the slot to a waiting request at once.

Sampling is per row (:func:`sampling.sample` with per-row knobs): token number ``i`` of a request is drawn
from ``fold_in(PRNGKey(seed), i)``, so what a request gets never depends on its batch-mates,
its slot, or when it was admitted or preempted.

:class:`DeviceRunner` runs them on one device or a colocated mesh: the weights where ``load``
placed them, the pool and the per-slot arrays replicated over the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from step3_jax.model import decoder
from step3_jax.model.config import Step3Config
from step3_jax.model.paged import PagedCache, init_pages
from step3_jax.model.sharding import replicated
from step3_jax.model.weights import Params
from step3_jax.runtime import sampling


def _last(x: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[1] - 1)[:, None, None], 1)[:, 0]


def prefill_chunk(params: Params, pages: PagedCache, tokens, table, start, num_new, keys,
                  index, temperature, top_k, top_p, *, cfg: Step3Config):
    """``tokens [R, C]`` (``num_new[r]`` real) at positions ``start[r]..`` of rows whose pages
    ``table [R, W]`` lists: the updated pool and a token sampled from each row's last real
    position (``[R]``)."""
    x, pages = decoder.extend_paged(params, tokens, pages, table, start, num_new, cfg)
    logits = decoder.logits_from_hidden(params, _last(x, num_new - 1), cfg)
    return pages, sampling.sample(logits, keys, index, temperature, top_k, top_p)


def decode_burst(params: Params, pages: PagedCache, tokens, lengths, active, n_gen, budget,
                 stop_ids, keys, temperature, top_k, top_p, table, *, cfg: Step3Config,
                 steps: int):
    """Up to ``steps`` decode steps for the ``[S]`` slots (``active`` rows feed ``tokens`` at
    position ``lengths`` and sample token number ``n_gen``). Stops after the step in which an
    active row draws one of its ``stop_ids [S, E]`` (-1: none) or reaches its ``budget``.
    Returns the pool, the tokens ``[S, steps]`` and how many steps ran."""
    slots = tokens.shape[0]
    feed = active.astype(jnp.int32)

    def cond(carry):
        step, _, _, _, _, done = carry
        return (step < steps) & ~jnp.any(done)

    def body(carry):
        step, pages, token, n, out, _ = carry
        x, pages = decoder.extend_paged(params, token[:, None], pages, table, lengths + step * feed,
                                        feed, cfg)
        logits = decoder.logits_from_hidden(params, x[:, 0], cfg)
        new = sampling.sample(logits, keys, n, temperature, top_k, top_p)
        new = jnp.where(active, new, token)
        n = n + feed
        stopped = jnp.any(new[:, None] == stop_ids, axis=-1) | (n >= budget)
        return (step + 1, pages, new, n, out.at[:, step].set(new), active & stopped)

    init = (jnp.int32(0), pages, tokens, n_gen, jnp.zeros((slots, steps), jnp.int32),
            jnp.zeros((slots,), bool))
    ran, pages, _, _, out, _ = jax.lax.while_loop(cond, body, init)
    return pages, out, ran


# Module-level, so engines built for the same config and shapes share compiled programs.
_prefill_jit = jax.jit(prefill_chunk, static_argnames=("cfg",), donate_argnums=(1,))
_burst_jit = jax.jit(decode_burst, static_argnames=("cfg", "steps"), donate_argnums=(1,))


class DeviceRunner:
    """The page pool on one device or a colocated mesh, and the two programs compiled per
    shape (prefill chunk length and table width; decode table width and burst length)."""

    def __init__(self, params: Params, cfg: Step3Config, mesh: Mesh, num_pages: int,
                 page_size: int):
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.rep = replicated(mesh)
        self.pages = init_pages(cfg, num_pages, page_size, dtype=params.embed.dtype,
                                sharding=self.rep)

    @property
    def placement(self) -> dict:
        return {"mesh": dict(self.mesh.shape),
                "devices": sorted(d.id for d in self.mesh.devices.flat)}

    def _put(self, *arrays):
        return [jax.device_put(a, self.rep) for a in arrays]

    groups = 1  # one page pool

    def prefill(self, slot: int, tokens: np.ndarray, table: np.ndarray, start: np.ndarray,
                num_new: np.ndarray, knobs: tuple) -> jax.Array:
        """Run one prefill chunk for the sequence in ``slot`` (host arrays, see
        :func:`prefill_chunk`); returns the sampled tokens ``[R]`` as a device array (not
        awaited)."""
        del slot  # every slot shares the one pool
        with jax.set_mesh(self.mesh):
            self.pages, token = _prefill_jit(self.params, self.pages,
                                             *self._put(tokens, table, start, num_new, *knobs),
                                             cfg=self.cfg)
        return token

    def decode(self, steps: int, rows: tuple, table: np.ndarray):
        """One :func:`decode_burst` of at most ``steps`` steps; ``rows``: ``(tokens, lengths,
        active, n_gen, budget, stop_ids, keys, temperature, top_k, top_p)`` host arrays.
        Returns ``(tokens [S, steps], steps run)`` on the host."""
        with jax.set_mesh(self.mesh):
            self.pages, out, ran = _burst_jit(self.params, self.pages, *self._put(*rows, table),
                                              cfg=self.cfg, steps=steps)
        return np.asarray(out), int(ran)
