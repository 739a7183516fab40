"""Batched generation: bucketed prefill, then one jitted on-device decode loop; and scoring.

``generate`` takes prompts of different lengths as one ragged batch. Prompts are right-padded to a
length bucket (:func:`bucket`) and prefilled together; each sequence then decodes from its own
position.
The decode loop is a single ``lax.while_loop`` inside one ``jit`` with explicit in/out shardings
and the KV cache donated; it stops each sequence on EOS, on the token budget, or cleanly at the
cache's capacity, and stops altogether when every sequence has. Lengths, the budget and the
sampling knobs are runtime arrays: a new prompt length inside a bucket, new sampling settings or
a new budget that keeps the cache capacity (:func:`shape_buckets`) do not recompile.

Either model family runs here: the decoder and its cache come from ``family.of(cfg).decoder``
(Step-3's MFA cache, or Step-3.5's per-layer cache with sliding-window rings).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from step3_jax.errors import Step3Error
from step3_jax.model import family
from step3_jax.model.cache import KVCache
from step3_jax.model.config import DEFAULT_PREFILL_CHUNK, Step3Config
from step3_jax.model.sharding import cache_shardings, make_mesh, named, replicated
from step3_jax.model.weights import Params
from step3_jax.runtime import sampling
from step3_jax.runtime.metrics import report

log = logging.getLogger("step3_jax")

FINISH_REASONS = ("running", "eos", "length", "capacity")
MIN_PREFILL_BUCKET = 16
MIN_CAPACITY = 64
BUCKET_STEP = 256


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    finish_reason: str  # "eos", "length" (token budget) or "capacity" (context full)
    text: str | None = None


def bucket(n: int, minimum: int) -> int:
    """The compiled length for ``n`` positions (at least ``minimum``): prefill lengths and cache
    capacities compile per bucket. The power of two ``p >= n`` up to 256; above, ``n`` rounded up
    to a multiple of ``max(256, p / 16)``: under 256 positions or 12.5% of padding, 8 buckets per
    doubling from 4096 on. Decode attention reads the cache's whole capacity, and a power of two
    read up to twice the context (8192 slots for 4096 + 32 tokens; BENCHMARKS.md)."""
    n = max(n, minimum)
    p = 1 << (n - 1).bit_length()
    step = max(BUCKET_STEP, p // 16)
    return min(p, -(-n // step) * step)


def shape_buckets(longest: int, max_new_tokens: int, cfg: Step3Config) -> tuple[int, int]:
    """``(prefill chunk, cache capacity)`` for a batch whose longest prompt has ``longest``
    tokens. The capacity follows the prompt's bucket, not its length, so every prompt length
    inside a bucket reuses one decode loop (for the same ``max_new_tokens``)."""
    chunk = bucket(longest, MIN_PREFILL_BUCKET)
    capacity = min(bucket(chunk + max_new_tokens - 1, MIN_CAPACITY), cfg.max_position_embedding)
    return min(chunk, capacity), capacity


def prefill_pieces(padded: int, prefill_chunk: int | None) -> tuple[int, int | None]:
    """``(padded prompt length, piece)``: a prompt bucket longer than ``prefill_chunk`` is
    prefilled in pieces of ``prefill_chunk`` tokens, its padded length rounded up to whole
    pieces; otherwise in one go (piece None)."""
    if not prefill_chunk or padded <= prefill_chunk:
        return padded, None
    return -(-padded // prefill_chunk) * prefill_chunk, prefill_chunk


def check_prefill_chunk(prefill_chunk: int | None) -> None:
    if prefill_chunk is not None and prefill_chunk < 0:
        raise Step3Error(f"--prefill-chunk must be >= 0 (0: the whole prompt at once), got "
                         f"{prefill_chunk}")


def check_prompts(prompts: Sequence[Sequence[int]], cfg: Step3Config) -> list[list[int]]:
    """Validate token ids and lengths; a one-line :class:`Step3Error` names the culprit."""
    if not prompts:
        raise Step3Error("no prompt given")
    out = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise Step3Error(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise Step3Error(f"token id {bad[0]} in prompt {i} is outside the vocabulary "
                             f"(0..{cfg.vocab_size - 1})")
        if len(prompt) > cfg.max_position_embedding:
            raise Step3Error(f"prompt {i} has {len(prompt)} tokens, longer than the context "
                             f"(max_position_embedding={cfg.max_position_embedding})")
        out.append(prompt)
    return out


def check_eos(eos_ids: Sequence[int] | None, cfg: Step3Config) -> None:
    """Stop ids must be token ids of the vocabulary (one outside it could never stop anything:
    a one-line :class:`Step3Error`). None means the config's ``eos_token_id``; ``[-1]`` alone
    means no stop token (decode to the budget)."""
    if list(eos_ids or ()) == [-1]:
        return
    for t in eos_ids or ():
        if not 0 <= t < cfg.vocab_size:
            raise Step3Error(f"--eos-id {t} is outside the vocabulary (0..{cfg.vocab_size - 1})")


@struct.dataclass
class _LoopState:
    step: jax.Array      # decode steps taken
    token: jax.Array     # [B] last sampled token (fed at the next step)
    done: jax.Array      # [B] bool
    reason: jax.Array    # [B] int32 index into FINISH_REASONS
    n_gen: jax.Array     # [B] tokens generated so far
    out: jax.Array       # [B, capacity] generated tokens
    cache: KVCache


def _record(state: _LoopState, token, budget, eos_ids) -> _LoopState:
    """Append ``token`` for running sequences and decide which of them stop."""
    running = ~state.done
    rows = jnp.arange(token.shape[0])
    out = state.out.at[rows, jnp.where(running, state.n_gen, state.out.shape[1])].set(
        token, mode="drop")
    n_gen = state.n_gen + running
    is_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
    full = state.cache.lengths >= state.cache.capacity
    reason = jnp.where(is_eos, 1, jnp.where(n_gen >= budget, 2, jnp.where(full, 3, 0)))
    stop = running & (reason > 0)
    return state.replace(token=token, out=out, n_gen=n_gen, done=state.done | stop,
                         reason=jnp.where(stop, reason, state.reason))


def _prefill(params, tokens, lengths, keys, budget, eos_ids, temperature, top_k, top_p, *,
             cfg: Step3Config, capacity: int, piece: int | None = None) -> _LoopState:
    """Prefill right-padded prompts into a fresh cache (``piece`` tokens at a time when given)
    and sample each sequence's first token."""
    logits, cache = family.of(cfg).decoder.prefill(params, tokens, lengths, capacity, cfg, piece)
    first = sampling.sample(logits, keys, jnp.int32(0), temperature, top_k, top_p)
    batch = tokens.shape[0]
    state = _LoopState(step=jnp.int32(0), token=first, done=jnp.zeros((batch,), bool),
                       reason=jnp.zeros((batch,), jnp.int32), n_gen=jnp.zeros((batch,), jnp.int32),
                       out=jnp.zeros((batch, capacity), jnp.int32), cache=cache)
    return _record(state, first, budget, eos_ids)


def _decode(params, state: _LoopState, keys, budget, eos_ids, temperature, top_k, top_p, *,
            cfg: Step3Config) -> _LoopState:
    """Decode until every sequence is done: one ``lax.while_loop`` over single-token steps."""

    decoder = family.of(cfg).decoder

    def body(state: _LoopState) -> _LoopState:
        logits, cache = decoder.forward(params, state.token[:, None], state.cache, cfg,
                                        num_new=(~state.done).astype(jnp.int32))
        token = sampling.sample(logits[:, 0], keys, state.step + 1, temperature, top_k, top_p)
        token = jnp.where(state.done, state.token, token)
        return _record(state.replace(step=state.step + 1, cache=cache), token, budget, eos_ids)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


class Generator:
    """Compiles and runs generation for one (params, config, mesh), keeping its executables.

    Two executables per shape bucket: the prefill (per batch, prompt bucket and capacity) and the
    decode loop (per batch and capacity), whose loop state — the KV cache included — is donated.
    A prompt bucket longer than ``prefill_chunk`` is prefilled that many tokens at a time (0 or
    None: the whole prompt at once).
    """

    def __init__(self, params: Params, cfg: Step3Config, mesh: Mesh | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        check_prefill_chunk(prefill_chunk)
        self.params, self.cfg, self.prefill_chunk = params, cfg, prefill_chunk
        self.mesh = mesh or _mesh_of(params)
        self._compiled: dict[tuple, object] = {}

    def _shardings(self, capacity: int):
        mesh = self.mesh
        per_seq, rep = named(mesh, ("batch",)), replicated(mesh)
        state = _LoopState(step=rep, token=per_seq, done=per_seq, reason=per_seq, n_gen=per_seq,
                           out=named(mesh, ("batch", "seq")),
                           cache=cache_shardings(self.cfg, mesh, capacity))
        knobs = (per_seq, per_seq, rep, rep, rep, rep)  # keys, budget, eos, temp., top-k, top-p
        # The weights stay where they are (placed by ``load`` from the rules table).
        return jax.tree.map(lambda a: a.sharding, self.params), state, knobs

    def _executable(self, name: str, key: tuple, fn, args, *, capacity: int, **static):
        """The compiled ``fn`` for this shape bucket, and the seconds spent compiling it now."""
        if (name, key) in self._compiled:
            return self._compiled[(name, key)], 0.0
        params_sh, state_sh, knobs_sh = self._shardings(capacity)
        if name == "prefill":
            static["capacity"] = capacity
        fn = functools.partial(fn, **static)
        if name == "prefill":
            per_seq = named(self.mesh, ("batch",))
            ins = (params_sh, named(self.mesh, ("batch", "seq")), per_seq, *knobs_sh)
            jitted = jax.jit(fn, in_shardings=ins, out_shardings=state_sh)
        else:
            jitted = jax.jit(fn, in_shardings=(params_sh, state_sh, *knobs_sh),
                             out_shardings=state_sh, donate_argnums=(1,))
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):  # the MoE reads it to run expert-parallel (moe.py)
            compiled = jitted.lower(*args).compile()
        self._compiled[(name, key)] = compiled
        return compiled, time.perf_counter() - start

    def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_ids: Sequence[int] | None = None):
        """Generate for ``prompts``; returns ``(list[GenerationResult], metrics dict)``."""
        cfg = self.cfg
        prompts = check_prompts(prompts, cfg)
        check_eos(eos_ids, cfg)
        sampling.check(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise Step3Error(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        chunk, capacity = shape_buckets(longest, max_new_tokens, cfg)
        chunk, piece = prefill_pieces(chunk, self.prefill_chunk)
        if longest + max_new_tokens - 1 > capacity:  # the last sampled token is never fed back
            log.warning("prompt + %d new tokens exceeds the context (%d): sequences stop at the "
                        "context's end", max_new_tokens, cfg.max_position_embedding)
        # Data parallelism splits the batch: pad it to a multiple of dp with one-token rows whose
        # budget of one token ends them at the prefill.
        dp = self.mesh.shape.get("dp", 1)
        batch = -(-len(prompts) // dp) * dp
        rows = prompts + [[0]] * (batch - len(prompts))
        tokens = np.zeros((batch, chunk), np.int32)
        for b, p in enumerate(rows):
            tokens[b, : len(p)] = p
        budget = np.full((batch,), max_new_tokens, np.int32)
        budget[len(prompts):] = 1
        eos = list(cfg.eos_token_ids if eos_ids is None else eos_ids) or [-1]
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch))
        knobs = (keys, jnp.asarray(budget), jnp.asarray(eos, jnp.int32),
                 jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        lengths = jnp.asarray([len(p) for p in rows], jnp.int32)

        prefill_args = (self.params, jnp.asarray(tokens), lengths, *knobs)
        prefill, compile_prefill = self._executable(
            "prefill", (batch, chunk, capacity, len(eos), piece), _prefill, prefill_args, cfg=cfg,
            capacity=capacity, piece=piece)
        start = time.perf_counter()
        state = jax.block_until_ready(prefill(*prefill_args))
        prefill_s = time.perf_counter() - start

        decode, compile_decode = self._executable(
            "decode", (batch, capacity, len(eos)), _decode, (self.params, state, *knobs), cfg=cfg,
            capacity=capacity)
        start = time.perf_counter()
        state = jax.block_until_ready(decode(self.params, state, *knobs))
        decode_s = time.perf_counter() - start

        out, n_gen, reason = (np.asarray(a) for a in (state.out, state.n_gen, state.reason))
        results = [GenerationResult(prompt_ids=p, generated_ids=out[b, : n_gen[b]].tolist(),
                                    finish_reason=FINISH_REASONS[reason[b]])
                   for b, p in enumerate(prompts)]
        steps = int(state.step)
        metrics = report(cfg, batch=len(prompts), mesh=dict(self.mesh.shape),
                         prefill_bucket=chunk, prefill_chunk=piece, cache_capacity=capacity,
                         generated_tokens=int(n_gen[: len(prompts)].sum()), decode_steps=steps,
                         compile_s=compile_prefill + compile_decode, prefill_s=prefill_s,
                         decode_s=decode_s, decode_step_s=decode_s / steps if steps else None)
        return results, metrics


def _mesh_of(params: Params) -> Mesh:
    """The mesh the weights were placed on (``load`` with shardings), else their one device."""
    sharding = jax.tree.leaves(params)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return sharding.mesh
    return make_mesh(devices=[next(iter(sharding.device_set))])


def generate(params: Params, cfg: Step3Config, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eos_ids: Sequence[int] | None = None, mesh: Mesh | None = None,
             prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
    """Generate for a ragged batch of token-id prompts; returns ``(results, metrics)``.

    One-shot convenience over :class:`Generator` (which keeps its compiled executables across
    calls). ``results[i]`` belongs to ``prompts[i]``; ``eos_ids`` defaults to the config's.
    """
    return Generator(params, cfg, mesh, prefill_chunk)(prompts, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, top_p=top_p,
                                        seed=seed, eos_ids=eos_ids)


@functools.partial(jax.jit, static_argnames="cfg")
def _token_logprobs(params, ids, cfg):
    logits, _ = family.of(cfg).decoder.forward(params, ids, None, cfg)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("cfg", "piece"))
def _token_logprobs_chunked(params, ids, cfg, piece):
    """:func:`_token_logprobs` ``piece`` tokens at a time against a growing cache: neither the
    activations nor the ``[piece, vocab]`` logits ever span the whole text."""
    decoder = family.of(cfg).decoder
    length = ids.shape[1]
    cache = decoder.init_cache(cfg, 1, length, dtype=params.embed.dtype)
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))

    def body(c, carry):
        cache, out = carry
        start = c * piece
        x, cache = decoder.extend(params, jax.lax.dynamic_slice_in_dim(ids, start, piece, 1),
                                  cache, cfg)
        logp = jax.nn.log_softmax(decoder.logits_from_hidden(params, x, cfg), axis=-1)
        target = jax.lax.dynamic_slice_in_dim(targets, start, piece, 1)
        got = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        return cache, jax.lax.dynamic_update_slice_in_dim(out, got, start, 1)

    out = jnp.zeros(ids.shape, jnp.float32)
    _, out = jax.lax.fori_loop(0, length // piece, body, (cache, out))
    return out[:, :-1]


def score(params: Params, cfg: Step3Config, ids: Sequence[int],
          prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> list[float]:
    """``[log p(ids[i] | ids[:i]) for i in 1..n-1]``: one full causal forward, or, for a text
    longer than ``prefill_chunk``, ``prefill_chunk`` tokens at a time against a growing cache."""
    (ids,) = check_prompts([ids], cfg)
    check_prefill_chunk(prefill_chunk)
    if len(ids) < 2:
        raise Step3Error("scoring needs at least 2 token ids")
    length, piece = prefill_pieces(bucket(len(ids), MIN_PREFILL_BUCKET), prefill_chunk)
    padded = np.zeros((1, length), np.int32)
    padded[0, : len(ids)] = ids  # causal: the padding after the text cannot change its scores
    with jax.set_mesh(_mesh_of(params)):
        if piece is None:
            logp = _token_logprobs(params, jnp.asarray(padded), cfg)
        else:
            logp = _token_logprobs_chunked(params, jnp.asarray(padded), cfg, piece)
    return np.asarray(logp[0, : len(ids) - 1], np.float64).tolist()
