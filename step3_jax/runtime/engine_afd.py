"""The engine on AFD's two device groups, in one process: :class:`AfdRunner`.

Each attention device holds its own page pool (the engine gives it the slots ``s`` with
``s % A == a`` and a separate free list) and runs its sequences' MFA over their pages; the FFN
group runs every token's FFN. Both programs go through AFD's own schedule
(:func:`afd_schedule.stack_pass`): a prefill chunk is one sequence on its attention device; a
decode step splits each attention device's slots into ``micro_batches`` micro-batches, pipelined
as in ``afd.generate`` (the micro-batches of a device share its pool). AFD's schedule is driven
from Python layer by layer, so a decode burst here is a host loop of single steps (each
dispatched without waiting), stopping early like the colocated burst when a sequence finishes.

Across processes (``runtime.distributed``) the engine does not run yet: the FFN processes follow
the attention process pass by pass (``RemoteFfn.begin_pass``), which would carry the engine's
changing shapes, but the engine's per-step scheduling, page tables and early exit are not part
of that protocol.
"""

from __future__ import annotations

import jax
import numpy as np

from step3_jax.model.paged import init_pages
from step3_jax.runtime.afd_schedule import Shard, next_tokens, stack_pass


def _pool_slots(table: np.ndarray, positions: np.ndarray, ok: np.ndarray, page_size: int,
                num_pages: int) -> np.ndarray:
    """``paged.pool_slots`` on the host for positions ``[R, T]``; ``ok`` False: dropped."""
    col = np.clip(positions // page_size, 0, table.shape[1] - 1)
    page = np.take_along_axis(table, col, axis=1)
    return np.where(ok, page * page_size + positions % page_size,
                    num_pages * page_size).astype(np.int32)


class AfdRunner:
    """An :class:`~step3_jax.runtime.afd.AfdModel`'s groups as the engine's device side."""

    def __init__(self, m, num_pages: int, page_size: int, max_num_seqs: int):
        if m.remote is not None:
            raise NotImplementedError("the engine does not drive a multi-process AFD FFN group")
        self.m, self.cfg = m, m.cfg
        self.groups = m.plan.attention
        self.num_pages, self.page_size = num_pages, page_size
        self.pools = []
        for device in m.attn_devices:
            pages = init_pages(self.cfg, num_pages, page_size, dtype=self.cfg.dtype,
                               sharding=device)
            self.pools.append((list(pages.k), list(pages.v)))

    @property
    def placement(self) -> dict:
        return self.m.placement | {"micro_batches": self.m.plan.micro_batches}

    def _shard(self, slot_group: int, rows: int) -> Shard:
        k, v = self.pools[slot_group]
        return Shard(slot_group, self.m.attn_devices[slot_group], slice(0, rows), k=k, v=v)

    def _draw(self, a: int, state, at, knobs):
        put = lambda x: jax.device_put(x, self.m.attn_devices[a])  # noqa: E731
        hs = tuple(s[0] for s in state)
        fs = tuple(s[1] for s in state)
        return next_tokens(self.m.local[a], hs, fs, put(at), *map(put, knobs), cfg=self.cfg)

    def prefill(self, slot: int, tokens, table, start, num_new, knobs):
        """One sequence's chunk through AFD's schedule on its attention device."""
        a = slot % self.groups
        chunk = tokens.shape[1]
        positions = start[:, None] + np.arange(chunk, dtype=np.int32)[None]
        ok = np.arange(chunk)[None] < num_new[:, None]
        feed = {"tokens": tokens, "positions": positions.astype(np.int32),
                "slots": _pool_slots(table, positions, ok, self.page_size, self.num_pages),
                "key_len": (start + num_new).astype(np.int32), "table": table}
        [[state]], _ = stack_pass(self.m, [[self._shard(a, 1)]], [[feed]])
        return self._draw(a, [state], (num_new - 1).astype(np.int32), knobs)

    def decode(self, steps: int, rows: tuple, table: np.ndarray):
        """The colocated burst's contract (``engine_steps.decode_burst``), one host-driven AFD
        step at a time."""
        tokens, lengths, active, n_gen, budget, stop, keys, temperature, top_k, top_p = rows
        slots, A = len(tokens), self.groups
        mb = self.m.plan.micro_batches
        # Each attention device's slots, split into micro-batches (the last ones may be short).
        mine = [np.arange(a, slots, A) for a in range(A)]
        parts = [np.array_split(rows_a, min(mb, len(rows_a))) for rows_a in mine]
        n_mb = max(len(p) for p in parts)
        mbs, index = [], []
        for j in range(n_mb):
            mbs.append([self._shard(a, len(parts[a][j])) for a in range(A) if j < len(parts[a])])
            index.append([parts[a][j] for a in range(A) if j < len(parts[a])])
        token, n = tokens.copy(), n_gen.copy()
        out = np.zeros((slots, steps), np.int32)
        feed_n = active.astype(np.int32)
        ran = 0
        while ran < steps:
            pos = lengths + ran * feed_n
            feeds = [[{"tokens": token[r][:, None], "positions": pos[r][:, None],
                       "slots": _pool_slots(table[r], pos[r][:, None], active[r][:, None],
                                            self.page_size, self.num_pages),
                       "key_len": (pos[r] + feed_n[r]).astype(np.int32), "table": table[r]}
                      for r in rs] for rs in index]
            state, _ = stack_pass(self.m, mbs, feeds)
            drawn = []
            for a in range(A):
                ks = [(j, s) for j in range(n_mb) for s, sh in enumerate(mbs[j]) if sh.index == a]
                r = np.concatenate([index[j][s] for j, s in ks])
                knobs = (keys[r], n[r], temperature[r], top_k[r], top_p[r])
                drawn.append((r, self._draw(a, [state[j][s] for j, s in ks],
                                            np.zeros(len(r), np.int32), knobs)))
            new = token.copy()
            for r, t in drawn:
                new[r] = np.asarray(t)
            token = np.where(active, new, token)
            n = n + feed_n
            out[:, ran] = token
            ran += 1
            if np.any(active & ((token[:, None] == stop).any(-1) | (n >= budget))):
                break
        return out, ran
