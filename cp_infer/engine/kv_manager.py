"""The KV cache manager: the one set of books for what the KV cache holds, over every CP rank.

It is pure host-side bookkeeping (no tensors, no process group), so it is tested alone, in one
process (tests/test_kv_manager.py). It owns:

- the block ledgers of every CP rank's pool (:class:`~cp_infer.engine.kv_pool.KVPool`);
- the :class:`PrefixIndex` that finds a cached sequence by its tokens;
- the state of every cached sequence, in one place: *running* (a request's turn uses it),
  *retained* (finished, kept for reuse until the pool needs its blocks; least recently used
  first), and *pinned* (a job elsewhere, a prefill tier's, skips its tokens: kept while it
  runs). A sequence's blocks are reclaimable exactly when it is retained and not pinned, and the
  ledgers are told so here only (:meth:`_sync_live`);
- the counts ``/metrics`` shows (:class:`PoolStats`).

The engine core asks it, and it decides nothing about requests: the core chooses what to admit,
what to preempt and when; the manager says what is shared, makes room and keeps the books::

    kv = KVCacheManager(pool)
    holder, shared = kv.match(tokens)               # the longest cached prefix
    seq, shared, copies = kv.start(holder, shared)  # a new running sequence, forked from it
    kv.reclaim(needs)                               # evict retained ones, LRU first
    kv.retain(seq, tokens)                          # its turn ended: kept for reuse
    kv.release(seq)                                 # gone: its blocks go back

``copies`` are the tokens of a partly shared block that each CP rank copies into the new
sequence's own block (:meth:`~cp_infer.engine.kv_cache.KVCache.copy_tail`); the ledgers already
say where they go.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from cp_infer.engine.kv_pool import KVPool, PoolFull
from cp_infer.engine.request import PoolStats
from cp_infer.engine.sizing import blocks_for_tokens

__all__ = ["Copy", "KVCacheManager", "PoolStats", "PrefixIndex", "common_prefix"]

logger = logging.getLogger(__name__)

#: (source slot, destination slot, tokens) a CP rank copies when a sequence forks, or None
Copy = tuple[int, int, int] | None


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``: slices compared in C,
    halving the range (a chat's history of 100K tokens is matched in microseconds)."""
    lo, hi = 0, min(limit, len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixIndex:
    """The sequences whose tokens are cached, found by their tokens: a hash chain over blocks.

    Block ``i`` of a sequence's tokens is keyed by a hash of itself and of block ``i - 1``'s key,
    so one key stands for a whole prefix. Matching walks a request's blocks down the chain to
    the deepest one some sequence holds, then compares tokens with those holders for the exact
    length (token granularity; a hash collision costs nothing but a comparison). A request that
    shares no whole block is compared with every sequence (short prompts).

    Args:
        block: tokens per key (the pool's block size).
    """

    MAX_CANDIDATES = 16  # holders of the deepest block compared token by token, newest first

    def __init__(self, block: int) -> None:
        self.block = block
        self.tokens: dict[int, list[int]] = {}  # seq -> its cached tokens
        self._chains: dict[int, list[int]] = {}  # seq -> its blocks' keys
        self._holders: dict[int, set[int]] = {}  # key -> seqs

    def _keys(self, tokens: Sequence[int]):
        key = 0
        for i in range(len(tokens) // self.block):
            key = hash((key, tuple(tokens[i * self.block : (i + 1) * self.block])))
            yield key

    def add(self, seq: int, tokens: Sequence[int]) -> None:
        """Index (or re-index) ``seq`` as holding ``tokens`` in the cache."""
        self.remove(seq)
        self.tokens[seq] = list(tokens)
        self._chains[seq] = list(self._keys(tokens))
        for key in self._chains[seq]:
            self._holders.setdefault(key, set()).add(seq)

    def remove(self, seq: int) -> None:
        self.tokens.pop(seq, None)
        for key in self._chains.pop(seq, ()):
            holders = self._holders[key]
            holders.discard(seq)
            if not holders:
                del self._holders[key]

    def match(self, tokens: Sequence[int]) -> tuple[int | None, int]:
        """The indexed sequence sharing the longest prefix with ``tokens``, and its length."""
        tokens = list(tokens)  # the indexed tokens are lists: compare like with like
        holders = None
        for key in self._keys(tokens):
            found = self._holders.get(key)
            if not found:
                break
            holders = found
        pool = sorted(holders or self.tokens, reverse=True)
        if holders:
            pool = pool[: self.MAX_CANDIDATES]
        best, best_len = None, 0
        for seq in pool:
            mine = self.tokens[seq]
            n = common_prefix(mine, tokens, len(mine))
            if n > best_len:
                best, best_len = seq, n
        return best, best_len


class KVCacheManager:
    """The books of the KV cache over every CP rank (see the module docstring).

    Args:
        pool: the block ledgers of every CP rank (shared with the
            :class:`~cp_infer.engine.kv_cache.KVCache` that holds this rank's tensors).
        share_prefixes: find cached prefixes; False: :meth:`match` finds none (a cold
            baseline).
        record: log every change to the ledgers in :attr:`ops` (``("free", seq)``, ``("fork",
            src, dst, position, copies)``), for other ranks to replay in order (the engine's
            step plans carry them).
    """

    def __init__(
        self, pool: KVPool, *, share_prefixes: bool = True, record: bool = False
    ) -> None:  # fmt: skip
        self.pool = pool
        self.record = record
        self.ops: list[tuple] = []
        self.share_prefixes = share_prefixes
        self.index = PrefixIndex(pool.block_size)
        self.running: set[int] = set()
        self.retained: OrderedDict[int, int] = OrderedDict()  # seq -> cached tokens; LRU first
        self.pins: Counter[int] = Counter()  # seq -> jobs that skip its tokens
        self._moving: list[int] = []  # sources of reshards the workers have not run yet
        # told of every retained sequence evicted, with its tokens, before its blocks go (a
        # KV tier spills it: :mod:`cp_infer.engine.tiering`)
        self.evicting: Callable[[int, list[int]], None] | None = None
        self.next_seq = 0
        self.stats = PoolStats(total_blocks=pool.n_blocks, block_size=pool.block_size, cp=pool.cp)

    # -- what is cached -------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def match(self, tokens: Sequence[int]) -> tuple[int | None, int]:
        """The cached sequence that shares the longest prefix with ``tokens``, and how many
        tokens it shares ((None, 0) without prefix sharing)."""
        return self.index.match(tokens) if self.share_prefixes else (None, 0)

    def cached_tokens(self, seq: int) -> int:
        """Tokens the index holds for ``seq`` (0 for one it does not)."""
        return len(self.index.tokens.get(seq, ()))

    def available(self) -> int:
        """Blocks the fullest rank can give: free, or held by retained sequences alone."""
        return self.pool.available()

    def blocks_for_tokens(self, tokens: int) -> int:
        """Blocks ``tokens`` of one new sequence take on the rank that gets most of them."""
        return self.pool.blocks_for_tokens(tokens)

    def blocks_for_tokens_on_one(self, tokens: int) -> int:
        """Blocks ``tokens`` of one new sequence take when they all lie on one rank."""
        return blocks_for_tokens(tokens, 1, self.pool.block_size)

    def needs(self, *batches) -> list[int]:
        """New blocks each CP rank's pool needs to store the tokens of ``batches``
        (:class:`~cp_infer.engine.batch.StepBatch`)."""
        needs = [0] * self.pool.cp
        for batch in batches:
            for r, plans in enumerate(batch.all_store_plans):
                ledger = self.pool.ledgers[r]
                needs[r] += sum(ledger.blocks_for(p.seq, len(p.positions)) for p in plans)
        return needs

    # -- sequences ------------------------------------------------------------------------------
    def new_seq(self) -> int:
        """A fresh sequence id, running (it holds no block until a pass stores its tokens)."""
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.running.add(seq)
        return seq

    def start(self, holder: int | None, shared: int) -> tuple[int, int, list[Copy]]:
        """A new running sequence starting with the first ``shared`` tokens of ``holder``.

        Whole blocks are shared; the tokens of a partly shared block are copied into a block of
        the new sequence's own (a retained sequence is evicted for it if need be). When even
        that block cannot be found, the new sequence shares nothing. A retained holder whose
        every token the new sequence now holds is dropped (superseded).

        Returns:
            (the new sequence, tokens it shares, each CP rank's :data:`Copy`).
        """
        seq = self.new_seq()
        if holder is None or shared == 0:
            return seq, 0, [None] * self.pool.cp
        try:
            copies = self.fork(holder, seq, shared)
        except PoolFull:
            return seq, 0, [None] * self.pool.cp
        return seq, shared, copies

    def fork(self, holder: int, seq: int, shared: int) -> list[Copy]:
        """``seq`` (new, no blocks yet) takes ``holder``'s first ``shared`` tokens; see
        :meth:`start`. Raises :class:`PoolFull` (nothing changed) without a block for the tail."""
        if not self.reclaim([1] * self.pool.cp, keep=holder):
            raise PoolFull("no free block for a partly shared block's tail")
        copies = self.pool.fork(holder, seq, shared)
        if self.record:
            self.ops.append(("fork", holder, seq, shared, copies))
        self._sync_live(seq)
        if holder in self.retained:
            self.retained.move_to_end(holder)
            if shared == self.cached_tokens(holder) and not self.pins[holder]:
                self.release(holder)  # superseded: all it had is in the new sequence
        return copies

    def reshard(self, holder: int, shared: int, rank: int) -> int | None:
        """A new running sequence with ``holder``'s first ``shared`` tokens, which lie on CP
        rank ``rank`` alone, spread over every rank as a prefill of them would have left them
        (a chat that outgrew one rank, moving onto the ring). The books change now; the K/V
        move when the workers replay the ``("reshard", holder, seq, shared, rank)`` op, and
        ``holder`` is pinned until then (:meth:`settle`). None: the pools cannot hold the copy
        (nothing changed)."""
        if not self.reclaim(self.pool.spread_needs(shared), keep=holder):
            return None
        seq = self.new_seq()
        self.pool.spread(seq, shared)
        self.pin(holder)
        self._moving.append(holder)
        if self.record:
            self.ops.append(("reshard", holder, seq, shared, rank))
        self._sync_live(seq)
        return seq

    def settle(self) -> None:
        """The workers have run the plan that moved resharded K/V: their sources may go."""
        for seq in self._moving:
            self.unpin(seq)
        self._moving.clear()

    def prefilled(self, seq: int, tokens: Sequence[int]) -> None:
        """A running sequence's ``tokens`` are all cached: later requests may share them."""
        assert seq in self.running, f"sequence {seq} does not run"
        self.index.add(seq, tokens)

    def retain(self, seq: int, tokens: Sequence[int]) -> None:
        """A sequence's turn ended with ``tokens`` cached: it stays for reuse (most recently
        used), its blocks reclaimable unless pinned."""
        self.running.discard(seq)
        self.retained[seq] = len(tokens)
        self.retained.move_to_end(seq)
        self.index.add(seq, tokens)
        self._sync_live(seq)

    def release(self, seq: int) -> None:
        """``seq`` leaves the cache (preempted, cancelled, failed, evicted): no longer found
        by its tokens; its blocks no other sequence holds go back to the pool. Its pins go
        too (a job that skipped its tokens then finds them gone, and fails alone)."""
        self.running.discard(seq)
        self.retained.pop(seq, None)
        self.pins.pop(seq, None)
        self.index.remove(seq)
        self.pool.free(seq)
        if self.record:
            self.ops.append(("free", seq))

    def pin(self, seq: int) -> None:
        """Keep ``seq`` (a job elsewhere skips its tokens) until as many :meth:`unpin`."""
        self.pins[seq] += 1
        self._sync_live(seq)

    def unpin(self, seq: int) -> None:
        if seq not in self.pins:  # released meanwhile
            return
        self.pins[seq] -= 1
        if not self.pins[seq]:
            del self.pins[seq]
        self._sync_live(seq)

    def held_back(self, seq: int) -> int:
        """Blocks (on the rank where it has most) that pinning ``seq`` keeps from being
        reclaimed: its own if it is retained and unpinned, else none (a running sequence's
        are not reclaimable anyway). An upper bound: blocks it shares count too."""
        if seq not in self.retained or self.pins[seq]:
            return 0
        return max(len(g.tables[seq].blocks) if seq in g.tables else 0 for g in self.pool.ledgers)

    def is_cached(self, seq: int) -> bool:
        return seq in self.running or seq in self.retained

    # -- room -----------------------------------------------------------------------------------
    def reclaim(self, needs: Sequence[int], keep: int | None = None) -> bool:
        """Evict retained sequences, least recently used first (not ``keep``, not a pinned
        one), until every rank ``r`` has ``needs[r]`` free blocks; False if it cannot."""
        for seq in list(self.retained):
            if self.pool.deficit(needs) <= 0:
                break
            if seq != keep and not self.pins[seq]:
                if self.evicting is not None:
                    self.evicting(seq, self.index.tokens[seq])
                self.release(seq)
        return self.pool.deficit(needs) <= 0

    def snapshot(self) -> PoolStats:
        """The pool and prefix reuse now (a copy)."""
        s = self.stats
        s.free_blocks = self.pool.available()
        s.usage = 1 - s.free_blocks / self.pool.n_blocks
        s.retained_tokens = sum(self.retained.values())
        return PoolStats(**vars(s))

    def check(self) -> None:
        """Assert the books add up (a test's and a debugger's view; O(blocks)):

        - every ledger's reference counts are its tables', every block free or held;
        - free plus held blocks make the pool, on every rank;
        - a sequence runs or is retained, not both; what the index finds is cached;
        - a block is reclaimable exactly when only retained, unpinned sequences hold it.
        """
        assert not self.running & set(self.retained), "a sequence both runs and is retained"
        assert set(self.index.tokens) <= self.running | set(self.retained), "index holds a ghost"
        assert all(n > 0 for n in self.pins.values())
        for g in self.pool.ledgers:
            g.check()
            held = {b for t in g.tables.values() for b in t.blocks}
            assert len(held) + g.n_free == g.n_blocks, "free plus held is not the pool"
            for seq, table in g.tables.items():
                assert self.is_cached(seq), f"sequence {seq} holds blocks but is not cached"
                assert table.live == self._live(seq), f"sequence {seq}'s liveness drifted"

    # -- internals ------------------------------------------------------------------------------
    def _live(self, seq: int) -> bool:
        return seq in self.running or self.pins[seq] > 0

    def _sync_live(self, seq: int) -> None:
        """The ledgers learn whether ``seq``'s blocks may be reclaimed (the one place)."""
        self.pool.set_live(seq, self._live(seq))
