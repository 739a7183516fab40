"""The Step-3.5 text decoder as pure functions: ``forward(params, tokens, cache, cfg) ->
(logits, cache)`` (``shared/spec/step35.md`` §2, §4).

Layer ``i`` (pre-norm, every norm zero-centred): ``h = x + Attn_i(ZNorm(x))``, then
``x' = h + FFN_i(ZNorm(h))``; the layer's kind -- full or sliding-window attention, its query
heads, RoPE theta, rotary width and scaling, dense or MoE FFN, its clamps -- comes from
``cfg.layer(i)`` (a :class:`~step3_jax.model.step35_config.LayerSpec`), so one code path runs
both kinds. Layers run in a Python loop over per-layer weights, as Step-3's decoder does. A layer
is :func:`attention_block` then :func:`ffn_block` on :func:`post_norm`'s output: AFD
(:mod:`step3_jax.runtime.afd_schedule`) runs the two halves on two device groups, the router on
the attention side.

The KV cache (:class:`Step35Cache`) is per layer. K/V heads are ``G x d`` on every layer; a full
layer keeps every position (slot = position), a sliding layer only the last ``window``: a ring
(slot = position mod window) holding ``p - window + 1 .. p`` after writing ``p``. A chunk of new
tokens attends over the cached keys plus its own (so a chunk longer than the window attends
within itself under the band mask), then writes its K/V -- on a sliding layer only its last
``window`` tokens. RoPE uses absolute positions, never slots.

The runtimes drive it through the interface of Step-3's ``decoder`` + ``cache``
(:mod:`step3_jax.model.family`): :func:`init_cache`, :func:`prefill` (right-padded prompts,
whole or in chunks, logits at each prompt's last token), :func:`extend` and :func:`forward`
against a cache, :func:`logits_from_hidden`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from step3_jax.model.cache import update
from step3_jax.model.decoder import chunked_prefill, take_at
from step3_jax.model.layers import linear
from step3_jax.model.step35_config import LayerSpec, Step35Config
from step3_jax.model.step35_layers import CacheView, attention, moe, shared_ffn, znorm
from step3_jax.model.step35_weights import Layer35, Moe35, Params35


# Logical axes of one layer's K and V arrays (the sharding rules table maps them to mesh axes):
# unlike Step-3's single MFA head, the G K/V heads can be split like the query heads.
CACHE_AXES = ("batch", "cache_len", "kv_heads", "head_dim")


@struct.dataclass
class Step35Cache:
    """Per-layer K/V ``[B, S_i, G, d]`` (``S_i``: the capacity on full layers, ``min(window,
    capacity)`` on sliding ones), the tokens each sequence holds, ``lengths [B]``, and the
    capacity, static: the positions a sequence may hold (a config of sliding layers only has
    no array that long)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array
    capacity: int = struct.field(pytree_node=False)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def cache_slots(cfg: Step35Config, layer: int, capacity: int) -> int:
    """Slots layer ``layer`` keeps for a cache of ``capacity`` positions."""
    return min(cfg.sliding_window, capacity) if cfg.is_sliding(layer) else capacity


def layer_shapes(cfg: Step35Config, batch: int, capacity: int) -> list[tuple[int, ...]]:
    """Each layer's K (and V) shape ``[batch, S_i, G, d]`` for ``capacity`` positions."""
    return [(batch, cache_slots(cfg, i, capacity), cfg.num_attention_groups, cfg.head_dim)
            for i in range(cfg.num_hidden_layers)]


def init_cache(cfg: Step35Config, batch: int, capacity: int, dtype=None) -> Step35Cache:
    """An empty cache for ``batch`` sequences of up to ``capacity`` positions."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shapes = layer_shapes(cfg, batch, capacity)
    return Step35Cache(k=tuple(jnp.zeros(s, dtype) for s in shapes),
                       v=tuple(jnp.zeros(s, dtype) for s in shapes),
                       lengths=jnp.zeros((batch,), jnp.int32), capacity=capacity)


def slot_positions(spec: LayerSpec, slots: int, lengths: jax.Array) -> jax.Array:
    """``[B, slots]``: the position each slot holds once ``lengths[b]`` tokens were written, or
    -1 when empty. Full layers: slot ``s`` holds position ``s``. Sliding layers: the latest
    ``p < lengths`` with ``p mod window == s``."""
    s = jnp.arange(slots, dtype=jnp.int32)[None, :]
    last = lengths[:, None] - 1
    if spec.window is None:
        return jnp.where(s <= last, s, -1)
    w = spec.window
    return jnp.where(s <= last, s + w * ((last - s) // w), -1)


def write_slots(spec: LayerSpec, slots: int, positions: jax.Array,
                num_new: jax.Array) -> jax.Array:
    """``[B, T]`` slots where this chunk's K/V go (``slots``, out of range, for tokens not
    written: padding past ``num_new``, and on a sliding layer all but the last ``window`` new
    tokens, so that no two tokens of a chunk write one ring slot)."""
    t = jnp.arange(positions.shape[1], dtype=jnp.int32)[None, :]
    keep = t < num_new[:, None]
    if spec.window is None:
        slot = positions
    else:
        slot = positions % spec.window
        keep &= t >= num_new[:, None] - spec.window
    return jnp.where(keep & (slot < slots), slot, slots)


def attention_block(p: Layer35, x: jax.Array, positions: jax.Array, spec: LayerSpec,
                    cfg: Step35Config, kv=None):
    """``h = x + Attn(ZNorm(x))``, the attention half of :func:`layer` (AFD runs it on the
    attention group), and the updated ``(k_cache, v_cache)`` (or None); ``kv`` as in
    :func:`layer`."""
    eps = cfg.rms_norm_eps
    u = znorm(x, p.input_norm, eps)
    with jax.named_scope("full_attention" if spec.window is None else "sliding_attention"):
        if kv is None:
            o, _ = attention(p.attn, u, positions, spec, eps, impl=cfg.attention_impl)
            new_kv = None
        else:
            k_cache, v_cache, lengths, num_new = kv
            slots = k_cache.shape[1]
            if lengths is None:  # an empty cache: the chunk attends within itself
                o, (k, v) = attention(p.attn, u, positions, spec, eps, None, cfg.attention_impl)
                where = write_slots(spec, slots, positions, num_new)
                new_kv = (update(k_cache, where, k), update(v_cache, where, v))
            else:
                view = CacheView(k_cache, v_cache, lengths, num_new,
                                 slot_positions(spec, slots, lengths),
                                 slot_positions(spec, slots, lengths + num_new),
                                 write_slots(spec, slots, positions, num_new))
                o, new_kv = attention(p.attn, u, positions, spec, eps, view, cfg.attention_impl)
    return x + o, new_kv


def post_norm(p: Layer35, h: jax.Array, cfg: Step35Config) -> jax.Array:
    """The FFN's input: ``ZNorm(h, post_attention_layernorm)``."""
    return znorm(h, p.post_norm, cfg.rms_norm_eps)


def ffn_block(ffn, y: jax.Array, spec: LayerSpec, cfg: Step35Config,
              routing=None) -> jax.Array:
    """The FFN half of :func:`layer` on the post-normed ``y``: the MoE (``routing``: its ``(weights,
    idx)`` computed elsewhere, as AFD's attention side does; default: routed here) or the dense
    clamped SwiGLU."""
    if isinstance(ffn, Moe35):
        return moe(ffn, y, spec, cfg, routing)
    with jax.named_scope("dense_ffn"):
        return shared_ffn(ffn, y, spec.swiglu_limit_shared)


def layer(p: Layer35, x: jax.Array, positions: jax.Array, spec: LayerSpec, cfg: Step35Config,
          kv=None):
    """One decoder layer: :func:`attention_block`, then :func:`ffn_block` on the post-normed
    ``h``. ``kv``: None (no cache) or ``(k_cache, v_cache, lengths, num_new)``: the chunk attends
    over what the cache holds for ``lengths [B]`` tokens and its own keys, then writes its first
    ``num_new [B]`` tokens' K/V; ``lengths=None`` means an empty cache (a prefill: attention
    within the chunk alone, nothing read). Returns the new hidden states and the updated
    ``(k_cache, v_cache)`` (or None)."""
    h, new_kv = attention_block(p, x, positions, spec, cfg, kv)
    return h + ffn_block(p.ffn, post_norm(p, h, cfg), spec, cfg), new_kv


def embed(params: Params35, tokens: jax.Array) -> jax.Array:
    return jnp.take(params.embed, tokens, axis=0)


def logits_from_hidden(params: Params35, x: jax.Array, cfg: Step35Config) -> jax.Array:
    """Final zero-centred norm and the LM head (no soft-capping); vocabulary padding ``-inf``."""
    with jax.named_scope("lm_head"):
        x = znorm(x, params.final_norm, cfg.rms_norm_eps)
        head = params.embed if params.lm_head is None else params.lm_head
        logits = linear(x, head).astype(jnp.float32)
        return jnp.where(jnp.arange(cfg.padded_vocab) >= cfg.vocab_size, -jnp.inf, logits)


def _positions(start: jax.Array, chunk: int) -> jax.Array:
    """``[B, chunk]``: the absolute positions of a chunk placed after ``start [B]`` tokens."""
    return start[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]


def _stack(params: Params35, tokens: jax.Array, cfg: Step35Config, cache: Step35Cache,
           lengths: jax.Array | None, num_new: jax.Array):
    """All layers over ``tokens`` placed after ``lengths`` (None: an empty cache) with the
    first ``num_new`` of each row written: the hidden states and the cache holding
    ``lengths + num_new`` tokens."""
    batch, chunk = tokens.shape
    start = jnp.zeros((batch,), jnp.int32) if lengths is None else lengths
    positions = _positions(start, chunk)
    x = embed(params, tokens)
    new_k, new_v = [], []
    for i, p in enumerate(params.layers):
        x, (k, v) = layer(p, x, positions, cfg.layer(i), cfg,
                          (cache.k[i], cache.v[i], lengths, num_new))
        new_k.append(k)
        new_v.append(v)
    return x, cache.replace(k=tuple(new_k), v=tuple(new_v), lengths=start + num_new)


def extend(params: Params35, tokens: jax.Array, cache: Step35Cache, cfg: Step35Config,
           num_new: jax.Array | None = None):
    """Hidden states ``[B, T, H]`` (before the final norm) of ``tokens`` appended after each
    sequence's ``cache.lengths`` (token ``t`` of sequence ``b`` for ``t < num_new[b]``, default
    all ``T``), and the cache holding them."""
    if num_new is None:
        num_new = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    return _stack(params, tokens, cfg, cache, cache.lengths, num_new)


def forward(params: Params35, tokens: jax.Array, cache: Step35Cache | None, cfg: Step35Config,
            num_new: jax.Array | None = None):
    """Logits ``[B, T, padded_vocab]`` (float32, padding ``-inf``) and the updated cache.

    Without a cache: a full causal forward over ``tokens [B, T]`` from position 0, returning
    ``(logits, None)``. With one: token ``t`` of sequence ``b`` goes at position
    ``cache.lengths[b] + t`` for ``t < num_new[b]`` (default all ``T``) and attends over what
    the cache holds before it (all of it on full layers, the last ``window`` positions on
    sliding ones); ``lengths`` grows by ``num_new``. Callers keep ``lengths + num_new`` within
    the cache's capacity (full-layer writes past it are dropped; ``generate`` stops there).
    """
    if cache is not None:
        x, cache = extend(params, tokens, cache, cfg, num_new)
        return logits_from_hidden(params, x, cfg), cache
    batch, chunk = tokens.shape
    positions = _positions(jnp.zeros((batch,), jnp.int32), chunk)
    x = embed(params, tokens)
    for i, p in enumerate(params.layers):
        x, _ = layer(p, x, positions, cfg.layer(i), cfg)
    return logits_from_hidden(params, x, cfg), None


def prefill(params: Params35, tokens: jax.Array, lengths: jax.Array, capacity: int,
            cfg: Step35Config, chunk: int | None = None):
    """Run right-padded prompts ``tokens [B, T]`` (``lengths[b]`` real tokens each) into a new
    cache of ``capacity`` positions; logits only at each prompt's last token: returns
    ``(logits [B, padded_vocab], cache)``.

    Without ``chunk`` (or with ``chunk >= T``) the prompt attends within itself at once (the
    band mask on sliding layers) and each ring keeps its last ``window`` tokens. With ``chunk``
    (``T`` a multiple of it) a ``fori_loop`` feeds ``chunk`` tokens at a time against the
    growing cache -- rings included, whether the chunk is shorter or longer than the window --
    so activations follow the chunk, not the prompt. Callers keep ``lengths <= capacity``.
    """
    batch, total = tokens.shape
    lengths = lengths.astype(jnp.int32)
    cache = init_cache(cfg, batch, capacity, dtype=params.embed.dtype)
    if chunk is None or chunk >= total:
        x, cache = _stack(params, tokens, cfg, cache, None, lengths)
        return logits_from_hidden(params, take_at(x, lengths - 1), cfg), cache
    last, cache = chunked_prefill(extend, params, tokens, lengths, cache, cfg, chunk)
    return logits_from_hidden(params, last, cfg), cache
