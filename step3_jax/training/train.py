"""Training as pure functions: the next-token loss, an AdamW step, and their shardings.

* :func:`loss_fn` ``(params, batch, cfg)`` — mean next-token cross-entropy (nats per token) of
  ``batch [B, T+1]`` over the *real* vocabulary (the ``-inf`` padding logits are sliced off
  before the softmax), from the same ``decoder.forward`` inference runs.
* :func:`train_step` ``(state, batch, cfg, optimizer) -> (state, metrics)`` — pure: gradients,
  then the optax update. :func:`jit_train_step` compiles it with in/out shardings from the same
  rules table as inference (``sharding.param_shardings``; AdamW's moments follow their weight,
  the batch is split over ``dp``), donates the state and runs it under the mesh, so a ``--mesh``
  that serves inference also serves a sharded training experiment.
* :func:`make_optimizer` — AdamW with linear warm-up and cosine decay, global-norm gradient
  clipping, weight decay on matrices only (not on norms).

The MoE kernel. The XLA:CPU inference kernel (``loop``) has data-dependent trip counts, which
reverse-mode differentiation cannot go through, and ``ragged_dot`` runs 3x slower than the
``blocks`` kernel on CPU for a training batch (4096 tokens, H 256, 8 experts of 256, top-3: 526
vs 154 ms forward+backward per layer; every expert on every token, masked: 318 ms). :func:`training_config`
therefore swaps ``auto`` for ``blocks`` on CPU (``ragged`` elsewhere); the arithmetic is the
same routed MoE, dropless, so trained weights run unchanged on the inference kernels.
Training keeps the canonical stacked expert layout (what expert parallelism splits and what
``store.save`` writes).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from step3_jax.errors import Step3Error
from step3_jax.model import decoder
from step3_jax.model.config import Step3Config
from step3_jax.model.sharding import make_mesh, named, param_shardings, replicated
from step3_jax.model.weights import Params, declare, init_params, map_specs, stack_experts


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params
    opt_state: Any


def training_config(cfg: Step3Config) -> Step3Config:
    """``cfg`` with a differentiable MoE kernel: ``blocks`` on CPU, ``ragged`` elsewhere."""
    if cfg.moe_impl == "loop":
        raise Step3Error("moe_impl 'loop' cannot be differentiated (data-dependent trip "
                         "counts); train with 'blocks' (CPU) or 'ragged'")
    if cfg.moe_impl != "auto":
        return cfg
    return cfg.replace(moe_impl="blocks" if jax.default_backend() == "cpu" else "ragged")


def lr_schedule(*, steps: int, peak_lr: float, warmup_steps: int, end_lr_ratio: float = 0.1):
    """Linear warm-up from 0 to ``peak_lr``, then cosine decay to ``end_lr_ratio * peak_lr``."""
    if steps < 1 or not 0 <= warmup_steps < steps:
        raise Step3Error(f"need steps >= 1 and 0 <= warmup < steps, got steps={steps}, "
                         f"warmup={warmup_steps}")
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, steps,
                                              end_value=peak_lr * end_lr_ratio)


def make_optimizer(cfg: Step3Config, *, steps: int, peak_lr: float = 3e-3,
                   warmup_steps: int = 100, end_lr_ratio: float = 0.1,
                   weight_decay: float = 0.1, clip_norm: float = 1.0, b1: float = 0.9,
                   b2: float = 0.95) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on a warm-up + cosine schedule (to ``end_lr_ratio`` of
    the peak at ``steps``); weight decay applies to weights of rank >= 2 only."""
    schedule = lr_schedule(steps=steps, peak_lr=peak_lr, warmup_steps=warmup_steps,
                           end_lr_ratio=end_lr_ratio)
    decay_mask = map_specs(lambda s: len(s.shape) >= 2, declare(cfg))
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))


def token_nll(params: Params, batch: jax.Array, cfg: Step3Config) -> jax.Array:
    """``[B, T]`` negative log-likelihood of ``batch[:, 1:]`` given its prefixes (nats)."""
    logits, _ = decoder.forward(params, batch[:, :-1], None, cfg)
    logits = logits[..., : cfg.vocab_size]  # drop the -inf vocabulary padding
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])


def loss_fn(params: Params, batch: jax.Array, cfg: Step3Config) -> jax.Array:
    """Mean next-token cross-entropy of ``batch [B, T+1]`` (int token ids), in nats."""
    return jnp.mean(token_nll(params, batch, cfg))


def train_step(state: TrainState, batch: jax.Array, cfg: Step3Config,
               optimizer: optax.GradientTransformation):
    """One optimizer step on ``batch``: returns the new state and ``{"loss", "grad_norm"}``
    (the loss and gradient norm *before* the update)."""
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, cfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ----- shardings and compiled steps --------------------------------------------------------------

def state_shardings(cfg: Step3Config, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """Shardings of a :class:`TrainState`: weights by the rules table, each optimizer moment
    like its weight, scalars (step, counts) replicated."""
    params_sh = param_shardings(cfg, mesh)
    abstract = map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.dtype)),
                         declare(cfg))
    opt_abstract = jax.eval_shape(optimizer.init, abstract)
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, opt_abstract, params_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: x is None)
    return TrainState(step=rep, params=params_sh, opt_state=opt_sh)


def batch_sharding(mesh: Mesh):
    """Samples split over ``dp`` (data parallel), tokens whole."""
    return named(mesh, ("batch", "seq"))


def init_state(cfg: Step3Config, optimizer: optax.GradientTransformation, seed: int = 0,
               mesh: Mesh | None = None, params: Params | None = None) -> TrainState:
    """Seeded weights (``weights.init_params``; or a copy of ``params``, stacked and placed) and
    fresh optimizer state, each created directly with its sharding on ``mesh`` (default one
    device). The state is donated to each step, so it never aliases the caller's arrays."""
    mesh = mesh or make_mesh()
    sh = state_shardings(cfg, optimizer, mesh)
    if params is None:
        params = init_params(cfg, seed, sh.params)
    else:
        # Copied where they are, then placed: device_put onto a larger mesh may reuse a source
        # buffer for one shard (even with may_alias=False), and the first step would donate it.
        copied = jax.tree.map(lambda a: jnp.array(a, copy=True), stack_experts(params))
        params = jax.device_put(copied, sh.params)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.int32(0), sh.step), params=params,
                      opt_state=opt_state)


def jit_train_step(cfg: Step3Config, optimizer: optax.GradientTransformation,
                   mesh: Mesh | None = None):
    """``step(state, batch) -> (state, metrics)``: :func:`train_step` compiled with the state's
    and batch's shardings on ``mesh`` (default one device), the state donated."""
    mesh = mesh or make_mesh()
    sh = state_shardings(cfg, optimizer, mesh)
    fn = jax.jit(functools.partial(train_step, cfg=cfg, optimizer=optimizer),
                 in_shardings=(sh, batch_sharding(mesh)), out_shardings=(sh, replicated(mesh)),
                 donate_argnums=0)
    dp = mesh.shape.get("dp", 1)

    def step(state: TrainState, batch):
        if batch.shape[0] % dp:
            raise Step3Error(f"batch of {batch.shape[0]} does not split over dp={dp}")
        with jax.set_mesh(mesh):  # the MoE reads it to run expert-parallel (moe.py)
            return fn(state, batch)

    return step


# ----- evaluation ----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="cfg")
def _nll_sum(params, samples, lengths, cfg):
    mask = jnp.arange(samples.shape[1] - 1)[None, :] < lengths[:, None]
    return jnp.sum(jnp.where(mask, token_nll(params, samples, cfg), 0.0))


def mean_nll(params: Params, samples: np.ndarray, cfg: Step3Config,
             lengths: np.ndarray | None = None, batch: int = 16) -> float:
    """Mean next-token NLL (nats per token) over ``samples [n, T+1]``: row ``i`` scores its
    first ``lengths[i]`` targets (default all ``T``). Runs ``batch`` rows at a time, the last
    batch padded with empty rows, so every call compiles one shape."""
    samples = np.asarray(samples, np.int32)
    n, width = samples.shape
    lengths = np.full((n,), width - 1, np.int32) if lengths is None else np.asarray(lengths,
                                                                                   np.int32)
    pad = -n % batch
    samples = np.concatenate([samples, np.zeros((pad, width), np.int32)])
    lengths = np.concatenate([lengths, np.zeros((pad,), np.int32)])
    total = sum(float(_nll_sum(params, jnp.asarray(samples[lo: lo + batch]),
                               jnp.asarray(lengths[lo: lo + batch]), cfg))
                for lo in range(0, n + pad, batch))
    return total / float(lengths.sum())
