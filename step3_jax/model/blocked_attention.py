"""Blocked (flash-style, online-softmax) attention: MFA's one shared K/V head, and GQA.

The plain product (``attention.plain_attend``) materializes every score: ``[B, T, n, S]``
float32, 34 GB for a 16,384-token prompt with 16 heads, which is why long prefill ran out of
memory (``shared/spec/cpu-performance.md``, "Long context"). ``blocked_attend`` computes the
same softmax over key blocks with a running max and sum (online softmax), so only one
``[q_block * n, k_block]`` score tile exists at a time.

Two things make it fast as well as small:

* **Heads fold into rows.** MFA shares one K head and one V head among all ``n`` query heads, so
  the ``q_block`` queries times ``n`` heads of a block are ``q_block * n`` rows against the *same*
  keys: one ``[q_block * n, d] x [d, k_block]`` matmul per tile instead of ``n`` thin ones. That
  is a large, efficient GEMM even at ``q_block = 1`` (decode: ``n`` rows).
* **Invisible blocks are skipped, not masked.** Each (batch row, query block) task loops only over
  the key blocks it can see: from the first block inside the window of its earliest query to the
  block holding ``min(latest query, key_len - 1)``. Tiles above the causal diagonal, outside the
  window, or at/past ``key_len`` are never computed, so causal prefill costs about half the square
  and a decode step reads only the filled part of its cache. The bounds are per batch row, so a
  short row of a ragged batch does not pay for the longest one. Only tiles that straddle a
  boundary are masked element-wise.

Key slot ``s`` has position ``s``; query ``t`` of row ``b`` sees key ``s`` iff ``s < key_len[b]``,
``s <= q_pos[b, t]`` and (no window, or ``q_pos[b, t] - s < window``): ``window`` positions
visible, the query's own included (Step-3.5's sliding layers, ``shared/spec/step35.md`` §2).

GQA (:func:`gqa_attend`, Step-3.5): ``G`` K/V heads in the ``[B, S, G, d]`` cache layout, query
head ``h`` reading K/V head ``h // (n / G)``. Each (row, K/V head, query block) is one task whose
``n / G`` query heads fold into rows exactly as MFA's ``n`` do; key blocks are read from the
cache in place, one head's ``[k_block, d]`` slice at a time. An optional ``key_start [B]`` hides
the slots below it (a ring buffer laid out in position order, its unfilled prefix first).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Masked scores: the most negative float32, not -inf, so no ``inf - inf`` NaN can appear.
_MASKED = float(np.finfo(np.float32).min)

# Default tile: about TILE_ROWS query rows (queries x heads) by TILE_SCORES / rows keys, 128 to
# 2048. Prefill (bench: 16 heads; Step-3: 64) gets 2048 rows x 128 keys, a 1 MiB float32 score
# tile that stays cache-resident through the softmax passes (512-key tiles measured slower);
# decode (16 rows) gets 2048-key blocks, long enough to amortize the per-iteration cost of the
# loop (tens of microseconds on XLA:CPU) and short enough that a short cache row reads little
# beyond its length. tools/bench_attention.py measures them.
TILE_ROWS = 2048
TILE_SCORES = 2048 * 128
K_BLOCK_RANGE = (128, 2048)


def visible(q_pos, k_pos, key_len, window, key_start=None):
    """Visibility ``[..., Tq, Sk]`` of keys at ``k_pos [..., Sk]`` to queries at ``q_pos [..., Tq]``
    given ``key_len [...]`` (broadcast over leading axes), an optional sliding ``window`` and an
    optional first visible slot ``key_start [...]``."""
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    ok = (kp < key_len[..., None, None]) & (kp <= qp)
    if window is not None:
        ok &= qp - kp < window
    if key_start is not None:
        ok &= kp >= key_start[..., None, None]
    return ok


def block_sizes(t_len, n, s_cap, q_block=None, k_block=None):
    """The (query, key) block sizes used for ``T = t_len`` queries of ``n`` heads over ``S =
    s_cap`` slots: the given ones, or the defaults above when None; never larger than T / S."""
    if q_block is None:
        q_block = max(1, TILE_ROWS // n)
    q_block = min(q_block, t_len)
    if k_block is None:
        k_block = int(np.clip(TILE_SCORES // (q_block * n), *K_BLOCK_RANGE))
    return q_block, min(k_block, s_cap)


def _key_block_range(q_pos, key_len, window, k_block, n_kblocks, key_start=None):
    """``[lo, hi)`` of the key blocks a query block at positions ``q_pos [Tq]`` can see."""
    last = jnp.minimum(jnp.max(q_pos), key_len - 1)  # newest visible key position
    hi = jnp.clip(last // k_block + 1, 0, n_kblocks)
    if window is None and key_start is None:
        return jnp.int32(0), hi
    first = jnp.int32(0) if window is None else jnp.min(q_pos) - window + 1  # oldest visible
    if key_start is not None:
        first = jnp.maximum(first, key_start)
    return jnp.clip(first // k_block, 0, hi), hi


def _contiguous_block(k_t, v, b, j, k_block):
    """Key block ``j`` of row ``b`` of a contiguous cache: ``(start, k [d, kb], v [kb, d])``.
    It nominally covers ``[j * k_block, (j + 1) * k_block)``; when ``S`` is not a multiple of
    ``k_block`` the last block's slice is clamped to end at ``S`` (``dynamic_slice``
    semantics) and the caller masks its keys below ``j * k_block``, already seen: no padded copy
    of the cache is ever made."""
    d, s_cap = k_t.shape[1], k_t.shape[2]
    start = jnp.minimum(j * k_block, s_cap - k_block)
    k_blk = jax.lax.dynamic_slice(k_t, (b, 0, start), (1, d, k_block))[0]
    v_blk = jax.lax.dynamic_slice(v, (b, start, 0), (1, k_block, d))[0]
    return start, k_blk, v_blk


def _gqa_block(k, v, b, g, j, k_block):
    """Key block ``j`` of K/V head ``g`` of row ``b`` of a ``[B, S, G, d]`` cache: ``(start,
    k [kb, d], v [kb, d])``, the last block clamped to end at ``S`` as in
    :func:`_contiguous_block`."""
    s_cap, d = k.shape[1], k.shape[3]
    start = jnp.minimum(j * k_block, s_cap - k_block)
    k_blk = jax.lax.dynamic_slice(k, (b, start, g, 0), (1, k_block, 1, d))[0, :, 0]
    v_blk = jax.lax.dynamic_slice(v, (b, start, g, 0), (1, k_block, 1, d))[0, :, 0]
    return start, k_blk, v_blk


def _paged_block(k_pages, v_pages, table, b, j, k_block):
    """Key block ``j`` of row ``b`` of a paged cache (``k_pages [P, d, page]``, ``v_pages
    [P, page, d]``, ``table [B, W]`` page ids, W a multiple of the block's pages): the block's
    ``k_block / page`` pages read from the pool by id, in the row's position order."""
    _, d, page = k_pages.shape
    per = k_block // page
    ids = jax.lax.dynamic_slice(table, (b, j * per), (1, per))[0]
    k_blk = jnp.moveaxis(jnp.take(k_pages, ids, axis=0), 0, 1).reshape(d, k_block)
    v_blk = jnp.take(v_pages, ids, axis=0).reshape(k_block, d)
    return j * k_block, k_blk, v_blk


def _attend_task(q_rows, q_pos, b, k_t, v, key_len, window, k_block, table=None, g=None,
                 key_start=None):
    """One (batch row ``b``, query block) task: ``q_rows [Tq * n, d]`` (heads folded into rows)
    at positions ``q_pos [Tq]``. Returns the output rows ``[Tq * n, d]`` and the number of key
    blocks visited. ``table``: ``k_t``/``v`` are page pools read through it
    (:func:`_paged_block`); ``g`` (GQA): ``k_t``/``v`` are ``[B, S, G, d]`` caches read at K/V
    head ``g`` (:func:`_gqa_block`); else a contiguous MFA cache (:func:`_contiguous_block`)."""
    rows, d = q_rows.shape
    tq = q_pos.shape[0]
    if g is not None:
        s_cap = k_t.shape[1]
    else:
        s_cap = k_t.shape[-1] if table is None else table.shape[1] * k_t.shape[-1]
    n_kblocks = -(-s_cap // k_block)
    length = key_len[b]
    first = None if key_start is None else key_start[b]
    scale = d ** -0.5
    lo, hi = _key_block_range(q_pos, length, window, k_block, n_kblocks, first)

    def body(j, carry):
        m, l, acc, visits = carry
        if g is not None:
            start, k_blk, v_blk = _gqa_block(k_t, v, b, g, j, k_block)
            s = jax.lax.dot_general(q_rows, k_blk, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * scale
        else:
            if table is None:
                start, k_blk, v_blk = _contiguous_block(k_t, v, b, j, k_block)
            else:
                start, k_blk, v_blk = _paged_block(k_t, v, table, b, j, k_block)
            s = jnp.dot(q_rows, k_blk, preferred_element_type=jnp.float32) * scale
        k_pos = start + jnp.arange(k_block, dtype=jnp.int32)
        mask = visible(q_pos, k_pos, length, window, first) & (k_pos >= j * k_block)  # [Tq, kb]
        mask = jnp.broadcast_to(mask[:, None, :], (tq, rows // tq, k_block)).reshape(rows, -1)
        s = jnp.where(mask, s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # A row with nothing visible yet has m_new == _MASKED: subtract 0 so its exps are 0.
        p = jnp.exp(s - jnp.where(m_new == _MASKED, 0.0, m_new)[:, None])
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.dot(p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[:, None] + pv, visits + 1

    init = (jnp.full((rows,), _MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32), jnp.int32(0))
    _, l, acc, visits = jax.lax.fori_loop(lo, hi, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # no visible key: zeros
    return out.astype(v.dtype), visits


@functools.partial(jax.jit, static_argnames=("window", "q_block", "k_block"))
def blocked_attend_stats(q, k_t, v, q_pos, key_len, table=None, *, window=None, q_block=None,
                         k_block=None):
    """``blocked_attend`` plus the number of key blocks each task visited, ``[B, T_blocks]``
    int32: the evidence that invisible blocks are skipped (tests, benchmarks)."""
    b_size, t_len, n, d = q.shape
    if table is None:
        qb, kb = block_sizes(t_len, n, k_t.shape[-1], q_block, k_block)
    else:
        qb, kb = paged_block_sizes(t_len, n, k_t.shape[-1], table.shape[1], q_block, k_block)
    n_qblocks = -(-t_len // qb)
    pad = n_qblocks * qb - t_len
    # Padded queries repeat the last position, so they widen no block's key range.
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, pad)), mode="edge")
    tasks = (q.reshape(b_size * n_qblocks, qb * n, d), q_pos.reshape(b_size * n_qblocks, qb),
             jnp.arange(b_size * n_qblocks, dtype=jnp.int32) // n_qblocks)
    key_len = key_len.astype(jnp.int32)

    def task(xs):
        return _attend_task(*xs, k_t, v, key_len, window, kb, table)

    out, visits = jax.lax.map(task, tasks)
    out = out.reshape(b_size, n_qblocks * qb, n, d)[:, :t_len]
    return out, visits.reshape(b_size, n_qblocks)


@functools.partial(jax.jit, static_argnames=("window", "q_block", "k_block"))
def gqa_attend_stats(q, k, v, q_pos, key_len, key_start=None, *, window=None, q_block=None,
                     k_block=None):
    """:func:`gqa_attend` plus the number of key blocks each task visited, ``[B, G,
    T_blocks]`` int32."""
    b_size, t_len, n, d = q.shape
    groups = k.shape[2]
    per = n // groups  # query heads per K/V head: the rows of one query
    qb, kb = block_sizes(t_len, per, k.shape[1], q_block, k_block)
    n_qblocks = -(-t_len // qb)
    pad = n_qblocks * qb - t_len
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, pad)), mode="edge")
    # Tasks ordered (row, K/V head, query block); a task's rows are its queries x heads.
    q = q.reshape(b_size, n_qblocks, qb, groups, per, d).transpose(0, 3, 1, 2, 4, 5)
    n_tasks = b_size * groups * n_qblocks
    task_id = jnp.arange(n_tasks, dtype=jnp.int32)
    q_pos = jnp.broadcast_to(q_pos.reshape(b_size, 1, n_qblocks, qb),
                             (b_size, groups, n_qblocks, qb))
    tasks = (q.reshape(n_tasks, qb * per, d), q_pos.reshape(n_tasks, qb),
             task_id // (groups * n_qblocks), (task_id // n_qblocks) % groups)
    key_len = key_len.astype(jnp.int32)
    key_start = None if key_start is None else key_start.astype(jnp.int32)

    def task(xs):
        rows, pos, b, g = xs
        return _attend_task(rows, pos, b, k, v, key_len, window, kb, g=g, key_start=key_start)

    out, visits = jax.lax.map(task, tasks)
    out = out.reshape(b_size, groups, n_qblocks, qb, per, d).transpose(0, 2, 3, 1, 4, 5)
    out = out.reshape(b_size, n_qblocks * qb, n, d)[:, :t_len]
    return out, visits.reshape(b_size, groups, n_qblocks)


def gqa_attend(q, k, v, q_pos, key_len, key_start=None, *, window=None, q_block=None,
               k_block=None):
    """Softmax attention of ``q [B, T, n, d]`` over ``G`` K/V heads ``k, v [B, S, G, d]`` (the
    Step-3.5 cache layout, read in place), query head ``h`` reading K/V head ``h // (n / G)``,
    one key block at a time.

    Visibility as :func:`blocked_attend` (slot ``s`` = position ``s``, ``key_len [B]``, the
    ``window``), and with ``key_start [B]`` slots below ``key_start[b]`` are invisible too.
    Scale ``1/sqrt(d)``, scores and softmax in float32; the result is ``[B, T, n, d]`` in
    ``v``'s dtype, zeros for a query with no visible key. Block sizes as :func:`block_sizes`
    with ``n / G`` rows per query."""
    out, _ = gqa_attend_stats(q, k, v, q_pos, key_len, key_start, window=window,
                              q_block=q_block, k_block=k_block)
    return out


def paged_block_sizes(t_len, n, page, width, q_block=None, k_block=None):
    """:func:`block_sizes` for a paged cache of ``width`` pages of ``page`` slots per row: the
    key block is a whole number of pages that divides ``width`` (a block never straddles the
    end of the page table)."""
    q_block, k_block = block_sizes(t_len, n, page * width, q_block, k_block)
    per = max(1, min(k_block // page, width))
    while width % per:
        per -= 1
    return q_block, per * page


def blocked_attend(q, k_t, v, q_pos, key_len, *, window=None, q_block=None, k_block=None,
                   table=None):
    """Softmax attention of ``q [B, T, n, d]`` over the shared key head ``k_t [B, d, S]`` (keys
    transposed, the KV-cache layout) and value head ``v [B, S, d]``, one key block at a time.

    ``q_pos [B, T]`` are the query positions, ``key_len [B]`` the filled cache lengths; see the
    module docstring for the visibility rule. Scores and softmax are float32; the result is
    ``[B, T, n, d]`` in ``v``'s dtype. A query with no visible key gets zeros. ``T`` and ``S``
    need not be multiples of the (static) block sizes, None picks ``block_sizes``' defaults.
    Peak score memory is one ``[q_block * n, k_block]`` float32 tile.

    With ``table [B, W]`` (page ids), ``k_t [P, d, page]`` and ``v [P, page, d]`` are page pools
    (:mod:`step3_jax.model.paged`): row ``b``'s slot ``s`` is slot ``s % page`` of page
    ``table[b, s // page]``, and each key block is read from the pool in place, a whole number
    of pages at a time (:func:`paged_block_sizes`)."""
    out, _ = blocked_attend_stats(q, k_t, v, q_pos, key_len, table, window=window,
                                  q_block=q_block, k_block=k_block)
    return out


def blocked_working_set_bytes(batch, t_len, n, d, s_cap, q_block=None, k_block=None,
                              itemsize=4):
    """Estimated bytes ``blocked_attend`` allocates beyond its inputs (output included), for a
    memory planner; an upper bound of XLA:CPU's temp + output sizes.

    One task's float32 tile state: scores and probabilities ``2 * R * kb`` (R = ``q_block * n``
    rows), the mask, running max/sum ``4 * R``, two accumulators ``2 * R * d`` and the K/V block
    slices; plus the ``[B, T, n, d]`` output and, when ``T`` is not a multiple of the query
    block, a padded copy of ``q`` and a padded output before slicing."""
    qb, kb = block_sizes(t_len, n, s_cap, q_block, k_block)
    rows = qb * n
    tile = 4 * (2 * rows * kb + 4 * rows + 2 * rows * d) + qb * kb + 2 * kb * d * itemsize
    t_pad = math.ceil(t_len / qb) * qb
    padded = 2 * batch * t_pad * n * d * itemsize if t_pad != t_len else 0
    return tile + batch * t_len * n * d * itemsize + padded


def plain_working_set_bytes(batch, t_len, n, d, s_cap, itemsize=4):
    """Estimated transient bytes of ``plain_attend``: scores, masked scores and probabilities,
    ``3 * B * T * n * S`` float32, plus the ``[B, T, S]`` mask and the output."""
    return 12 * batch * t_len * n * s_cap + batch * t_len * s_cap + batch * t_len * n * d * itemsize
