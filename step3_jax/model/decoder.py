"""The Step-3 decoder as pure functions: ``forward(params, tokens, cache, cfg) -> (logits, cache)``.

Decoder layer ``i`` (pre-norm): ``h = x + MFA(norm_in(x))``, then ``x' = h + FFN(norm_post(h))``
with FFN the routed MoE plus shared expert in ``cfg.moe_layers`` and a dense SwiGLU elsewhere.
Layers run in a Python loop over per-layer weights (see ``weights.py`` for why not a scan over
stacked layers on XLA:CPU); each layer reads and updates its own K/V cache arrays in place.

Three ways to run the stack, one code path:

* no cache — a full causal forward over ``tokens`` (scoring, teacher forcing);
* :func:`prefill` — the same attention over the prompt chunk, writing K/V into a fresh cache and
  computing logits only at each sequence's last prompt token;
* with a cache — ``tokens`` are appended after each sequence's ``cache.lengths`` and attend over
  the whole cache (decode steps, chunked continuation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from step3_jax.model import attention, paged
from step3_jax.model.cache import KVCache, init_cache, update, update_keys, write_positions
from step3_jax.model.config import Step3Config
from step3_jax.model.layers import linear, rms_norm, swiglu
from step3_jax.model.moe import moe
from step3_jax.model.paged import PagedCache
from step3_jax.model.weights import Layer, Mlp, Moe, Params


def attention_block(p: Layer, x, positions, kv, cfg: Step3Config):
    """``x + MFA(norm_in(x))`` and the layer's updated ``(k_cache, v_cache)`` (or None).

    ``kv`` is ``None`` (no cache) or ``(k_cache, v_cache, slots, key_len)``: this chunk's K/V are
    written at ``slots``; with ``key_len [B]`` the queries attend over the cache's first
    ``key_len[b]`` slots, with ``key_len=None`` over the chunk itself (prefill into an empty cache).
    A fifth element, a page table ``[B, W]``, makes ``k_cache``/``v_cache`` the layer's page pools
    (:mod:`.paged`), ``slots`` flat pool slots, and the queries attend over each row's pages.
    """
    with jax.named_scope("mfa"):
        q, k, v = attention.project_qkv(p.attn, rms_norm(x, p.input_norm, cfg.rms_norm_eps),
                                        positions, cfg)
        new_kv, table = None, None
        if kv is not None:
            k_cache, v_cache, slots, key_len, *rest = kv
            table = rest[0] if rest else None
            if table is None:
                k_cache, v_cache = update_keys(k_cache, slots, k), update(v_cache, slots, v)
            else:
                k_cache, v_cache = paged.write(k_cache, v_cache, slots, k, v)
            new_kv = (k_cache, v_cache)
        if table is not None:
            o = paged.attend_pages(q, k_cache, v_cache, table, positions, key_len, cfg)
            return x + attention.output(p.attn, o), new_kv
        if kv is not None and key_len is not None:
            keys_t, values = k_cache, v_cache
        else:  # attention within the chunk itself (no earlier keys; positions start at 0)
            keys_t, values = jnp.swapaxes(k, 1, 2), v
            key_len = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
        o = attention.attend_positions(q, keys_t, values, positions, key_len, cfg)
        return x + attention.output(p.attn, o), new_kv


def ffn_block(ffn: Mlp | Moe, y, cfg: Step3Config, routing=None):
    """The layer's FFN on the post-attention-normed ``y``: routed MoE + shared expert, or dense.

    ``routing``: precomputed ``(weights, idx)`` (AFD computes it on the attention side).
    """
    if isinstance(ffn, Moe):
        return moe(ffn, y, cfg, routing)
    with jax.named_scope("dense_ffn"):
        return swiglu(y, ffn.gate, ffn.up, ffn.down)


def _layer(p: Layer, x, positions, kv, cfg: Step3Config):
    """One decoder layer (pre-norm): attention block, then the FFN on ``norm_post(h)``."""
    h, new_kv = attention_block(p, x, positions, kv, cfg)
    return h + ffn_block(p.ffn, rms_norm(h, p.post_norm, cfg.rms_norm_eps), cfg), new_kv


def _stack(params: Params, x, positions, kv, cfg: Step3Config):
    """All decoder layers. ``kv``: None or ``(k_caches, v_caches, slots, key_len[, table])``.

    Returns the final hidden states and the updated per-layer ``(k_caches, v_caches)`` (or None).
    """
    new_k, new_v = [], []
    for i, p in enumerate(params.layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i], *kv[2:])
        x, updated = _layer(p, x, positions, layer_kv, cfg)
        if updated is not None:
            new_k.append(updated[0])
            new_v.append(updated[1])
    return x, (None if kv is None else (tuple(new_k), tuple(new_v)))


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    return jnp.take(params.embed, tokens, axis=0)


def logits_from_hidden(params: Params, x: jax.Array, cfg: Step3Config) -> jax.Array:
    """Final RMSNorm and the untied LM head; the vocabulary padding is masked to ``-inf``."""
    with jax.named_scope("lm_head"):
        x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
        head = params.embed if params.lm_head is None else params.lm_head  # [V_pad, H]
        logits = linear(x, head).astype(jnp.float32)
        pad = jnp.arange(cfg.padded_vocab) >= cfg.vocab_size
        return jnp.where(pad, -jnp.inf, logits)


def extend(params: Params, tokens: jax.Array, cache: KVCache, cfg: Step3Config,
           num_new: jax.Array | None = None):
    """Hidden states ``[B, T, H]`` of ``tokens`` appended after each sequence's
    ``cache.lengths`` (token ``t`` of sequence ``b`` for ``t < num_new[b]``), and the cache."""
    batch, chunk = tokens.shape
    if num_new is None:
        num_new = jnp.full((batch,), chunk, jnp.int32)
    positions = cache.lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    slots = write_positions(cache.lengths, num_new, chunk, cache.capacity)
    key_len = jnp.minimum(cache.lengths + num_new, cache.capacity)
    x, (k, v) = _stack(params, embed(params, tokens), positions,
                       (cache.k, cache.v, slots, key_len), cfg)
    return x, KVCache(k=k, v=v, lengths=key_len)


def extend_paged(params: Params, tokens: jax.Array, pages: PagedCache, table: jax.Array,
                 lengths: jax.Array, num_new: jax.Array, cfg: Step3Config):
    """:func:`extend` over a paged cache: hidden states ``[B, T, H]`` of ``tokens`` placed at
    positions ``lengths[b] + t`` (for ``t < num_new[b]``) of the sequences whose pages
    ``table [B, W]`` lists, and the updated pools. Row ``b`` attends over its first
    ``lengths[b] + num_new[b]`` positions; its table must hold a page for each of them."""
    chunk = tokens.shape[1]
    positions = lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    slots = paged.pool_slots(table, lengths, num_new, chunk, pages.page_size, pages.num_pages)
    x, (k, v) = _stack(params, embed(params, tokens), positions,
                       (pages.k, pages.v, slots, lengths + num_new, table), cfg)
    return x, PagedCache(k=k, v=v)


def forward(params: Params, tokens: jax.Array, cache: KVCache | None, cfg: Step3Config,
            num_new: jax.Array | None = None):
    """Logits ``[B, T, padded_vocab]`` (float32, padding = ``-inf``) and the updated cache.

    Without a cache: a full causal forward over ``tokens [B, T]`` from position 0; returns
    ``(logits, None)``. With a cache: token ``t`` of sequence ``b`` is placed at position
    ``cache.lengths[b] + t`` for ``t < num_new[b]`` (default: all ``T``) and attends over everything
    cached before it; ``lengths`` grows by ``num_new``. Slots past the capacity are never written
    (see ``cache.write_positions``): callers check capacity before calling (``generate`` does).
    """
    if cache is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :],
                                     tokens.shape)
        x, _ = _stack(params, embed(params, tokens), positions, None, cfg)
        return logits_from_hidden(params, x, cfg), None
    x, cache = extend(params, tokens, cache, cfg, num_new)
    return logits_from_hidden(params, x, cfg), cache


def take_at(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[b, index[b]]`` for ``x [B, T, H]``: each sequence's hidden state at one position."""
    return jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[1] - 1)[:, None, None], axis=1)[:, 0]


def prefill(params: Params, tokens: jax.Array, lengths: jax.Array, capacity: int,
            cfg: Step3Config, chunk: int | None = None):
    """Run right-padded prompts ``tokens [B, T]`` (``lengths[b]`` real tokens each) into a new cache.

    K/V are written to slots ``0 .. lengths[b]-1`` and logits are computed only at each prompt's
    last token: returns ``(logits [B, padded_vocab], cache)``. Without ``chunk`` (or with
    ``chunk >= T``) attention runs within the whole prompt at once. With ``chunk`` (``T`` a
    multiple of it), a ``fori_loop`` feeds the prompt ``chunk`` tokens at a time against the
    growing cache, so activations are bounded by the chunk, not the prompt (chunked prefill).
    """
    batch, total = tokens.shape
    cache = init_cache(cfg, batch, capacity, dtype=params.embed.dtype)
    if chunk is None or chunk >= total:
        positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32)[None, :], tokens.shape)
        slots = write_positions(cache.lengths, lengths, total, capacity)
        x, (k, v) = _stack(params, embed(params, tokens), positions,
                           (cache.k, cache.v, slots, None), cfg)
        cache = KVCache(k=k, v=v, lengths=jnp.minimum(lengths, capacity).astype(jnp.int32))
        return logits_from_hidden(params, take_at(x, lengths - 1), cfg), cache
    last, cache = chunked_prefill(extend, params, tokens, lengths, cache, cfg, chunk)
    return logits_from_hidden(params, last, cfg), cache


def chunked_prefill(extend_fn, params, tokens: jax.Array, lengths: jax.Array, cache, cfg,
                    chunk: int):
    """The chunked half of either family's ``prefill``: a ``fori_loop`` feeding ``chunk``
    tokens at a time of the right-padded ``tokens [B, T]`` (``T`` a multiple of ``chunk``)
    through ``extend_fn(params, piece, cache, cfg, num_new)`` into ``cache``; returns the hidden
    states at each prompt's last token ``[B, H]`` (for the family's ``logits_from_hidden``) and
    the cache."""
    batch, total = tokens.shape
    if total % chunk:
        raise ValueError(f"prefill chunk {chunk} does not divide the padded prompt ({total})")
    last_chunk = (lengths - 1) // chunk

    def body(c, carry):
        cache, last = carry
        piece = jax.lax.dynamic_slice_in_dim(tokens, c * chunk, chunk, axis=1)
        num_new = jnp.clip(lengths - c * chunk, 0, chunk).astype(jnp.int32)
        x, cache = extend_fn(params, piece, cache, cfg, num_new)
        last = jnp.where((last_chunk == c)[:, None], take_at(x, num_new - 1), last)
        return cache, last

    last = jnp.zeros((batch, cfg.hidden_size), params.embed.dtype)
    cache, last = jax.lax.fori_loop(0, total // chunk, body, (cache, last))
    return last, cache
