"""The KV cache manager alone: no tensors, no process group, one process.

A seeded random walk drives the manager the way the engine core does (admit a prompt from the
longest cached prefix, store a prefill's or a decode's tokens, commit or abort the pass, end a
turn, preempt, evict, pin for a remote prefill) over pools of every CP size, and after every
operation checks the books (:meth:`KVCacheManager.check`: reference counts, free plus held is
the pool, liveness) and a shadow model of what each sequence holds.
"""

from __future__ import annotations

import random

import pytest

from cp_infer.engine.kv_manager import KVCacheManager, common_prefix
from cp_infer.engine.kv_pool import KVPool, PoolFull
from cp_infer.sharding import span_positions

OPS = 12_000


class Walk:
    """The manager, and what each cached sequence should hold: its tokens (all of them cached)
    and, per CP rank, the positions of them that rank keeps."""

    def __init__(self, seed: int, cp: int, n_blocks: int, block: int) -> None:
        self.rng = random.Random(seed)
        self.kv = KVCacheManager(KVPool(n_blocks, block, cp))
        self.cp = cp
        self.tokens: dict[int, list[int]] = {}
        self.stems = [[self.rng.randrange(50) for _ in range(3 * block)] for _ in range(3)]
        self.ops = {name: 0 for name in ("admit", "store", "abort", "decode", "retire",
                                         "preempt", "evict", "pin", "unpin", "full", "shared")}  # fmt: skip

    # -- the operations ------------------------------------------------------------------------
    def prompt(self) -> list[int]:
        """A prompt that often shares a prefix with an earlier one (a stem, a cached sequence)."""
        rng = self.rng
        cached = [s for s in self.tokens if self.kv.is_cached(s) and self.tokens[s]]
        if cached and rng.random() < 0.4:
            base = self.tokens[rng.choice(cached)]
            base = base[: rng.randrange(1, len(base) + 1)]
        else:
            base = rng.choice(self.stems)[: rng.randrange(1, 3 * self.kv.block_size)]
        return base + [rng.randrange(50) for _ in range(rng.randrange(1, 2 * self.kv.block_size))]

    def admit(self) -> None:
        tokens = self.prompt()
        holder, shared = self.kv.match(tokens)
        if holder is not None:
            assert shared == common_prefix(self.tokens[holder], tokens, len(tokens))
        shared = min(shared, len(tokens) - 1)
        before = (
            [self.kv.pool.ledgers[r].positions_of(holder) for r in range(self.cp)]
            if holder is not None else None
        )  # fmt: skip
        seq, shared, copies = self.kv.start(holder, shared)
        assert len(copies) == self.cp
        self.tokens[seq] = tokens[:shared]
        if shared:  # each rank holds the holder's positions below the cut, nothing else
            self.ops["shared"] += 1
            for r in range(self.cp):
                got = self.kv.pool.ledgers[r].positions_of(seq)
                assert got == [p for p in before[r] if p < shared]
        self.store(seq, tokens[shared:])
        self.ops["admit"] += 1

    def store(self, seq: int, new: list[int]) -> bool:
        """One pass storing ``new`` after ``seq``'s tokens, its room made first (evicting, then
        preempting another running sequence); committed, or aborted at random."""
        start = len(self.tokens[seq])
        plans = [span_positions(start, start + len(new), self.cp, r) for r in range(self.cp)]
        return self._pass(seq, new, plans)

    def decode(self) -> None:
        running = sorted(self.kv.running)
        if not running:
            return
        seq = self.rng.choice(running)
        n = len(self.tokens[seq])
        plans = [[n] if r == (seq + n) % self.cp else [] for r in range(self.cp)]
        self._pass(seq, [self.rng.randrange(50)], plans)
        self.ops["decode"] += 1

    def _pass(self, seq: int, new: list[int], plans: list[list[int]]) -> bool:
        ledgers = self.kv.pool.ledgers
        needs = [g.blocks_for(seq, len(p)) for g, p in zip(ledgers, plans, strict=True)]
        while not self.kv.reclaim(needs):
            others = sorted(self.kv.running - {seq})
            if not others:  # it cannot fit alone: it fails
                self.kv.release(seq)
                self.ops["full"] += 1
                return False
            self.preempt(self.rng.choice(others))
        free = [g.n_free for g in ledgers]
        for g, p in zip(ledgers, plans, strict=True):
            if p:
                g.append(seq, p)
        if self.rng.random() < 0.1:  # the pass failed: as if it never ran
            self.kv.pool.abort()
            assert [g.n_free for g in ledgers] == free
            self.ops["abort"] += 1
            return False
        self.kv.pool.commit()
        self.tokens[seq] = self.tokens[seq] + new
        self.ops["store"] += 1
        return True

    def preempt(self, seq: int) -> None:
        self.kv.release(seq)
        self.ops["preempt"] += 1

    def retire(self) -> None:
        running = sorted(self.kv.running)
        if running:
            seq = self.rng.choice(running)
            self.kv.retain(seq, self.tokens[seq])
            self.ops["retire"] += 1

    def evict(self) -> None:
        needs = [self.rng.randrange(self.kv.pool.n_blocks + 1) for _ in range(self.cp)]
        before = set(self.kv.retained)
        ok = self.kv.reclaim(needs)
        gone = before - set(self.kv.retained)
        assert not gone & set(self.kv.pins), "a pinned sequence was evicted"
        if not ok:  # everything evictable went
            assert all(s in self.kv.pins for s in self.kv.retained)
        self.ops["evict"] += 1

    def pin(self) -> None:
        if self.kv.pins and self.rng.random() < 0.5:
            self.kv.unpin(self.rng.choice(sorted(self.kv.pins)))
            self.ops["unpin"] += 1
        elif self.kv.retained:
            self.kv.pin(self.rng.choice(sorted(self.kv.retained)))
            self.ops["pin"] += 1

    # -- the checks ----------------------------------------------------------------------------
    def check(self) -> None:
        kv = self.kv
        kv.check()
        for seq in kv.running | set(kv.retained):
            n = len(self.tokens[seq])
            held = [kv.pool.ledgers[r].positions_of(seq) for r in range(self.cp)]
            assert sorted(p for h in held for p in h) == list(range(n)), f"seq {seq} lost tokens"
        for seq, tokens in kv.index.tokens.items():
            assert tokens == self.tokens[seq][: len(tokens)]
        for g in kv.pool.ledgers:  # the budget: what running sequences hold never exceeds it
            assert g.n_blocks - g.n_free - g.reclaimable >= 0
            assert g.n_free + g.reclaimable <= g.n_blocks

    def run(self, n_ops: int) -> None:
        choices = [self.admit] * 3 + [self.decode] * 4 + [self.retire] * 2 + [
            self.evict, self.pin, lambda: self.preempt_some(),
        ]  # fmt: skip
        for _ in range(n_ops):
            self.rng.choice(choices)()
            self.check()

    def preempt_some(self) -> None:
        running = sorted(self.kv.running)
        if running:
            self.preempt(self.rng.choice(running))


@pytest.mark.parametrize("cp,n_blocks,block", [(1, 24, 4), (2, 16, 4), (3, 12, 2), (4, 20, 8)])
def test_a_long_random_walk_keeps_the_books(cp, n_blocks, block):
    walk = Walk(seed=cp, cp=cp, n_blocks=n_blocks, block=block)
    walk.run(OPS)
    # every kind of operation ran many times, the pool filled and emptied
    assert all(n > 50 for k, n in walk.ops.items() if k != "full"), walk.ops
    for seq in list(walk.kv.pins):  # everything released: every block comes back
        while seq in walk.kv.pins:
            walk.kv.unpin(seq)
    for seq in [*walk.kv.running, *walk.kv.retained]:
        walk.kv.release(seq)
    walk.kv.check()
    assert all(g.n_free == g.n_blocks and not g.tables for g in walk.kv.pool.ledgers)
    assert not walk.kv.index.tokens


def test_prefix_matching_shares_blocks_and_supersedes_a_retained_holder():
    kv = KVCacheManager(KVPool(8, 4, 2))
    a = kv.new_seq()
    for r, g in enumerate(kv.pool.ledgers):
        g.append(a, span_positions(0, 10, 2, r))
    kv.pool.commit()
    tokens = list(range(10))
    kv.retain(a, tokens)
    assert kv.match([*tokens, 99]) == (a, 10)
    assert kv.match([0, 1, 2, 7]) == (a, 3)
    seq, shared, copies = kv.start(a, 10)  # all of a: a is superseded and leaves
    assert shared == 10 and a not in kv.retained and not kv.pool.ledgers[0].tables.get(a)
    assert any(c is not None for c in copies)  # 5 tokens a rank: a partly shared block copied
    kv.check()
    kv.retain(seq, tokens)
    kv.pin(seq)
    assert not kv.reclaim([8, 8]) and seq in kv.retained  # pinned: never evicted
    kv.unpin(seq)
    assert kv.reclaim([8, 8]) and seq not in kv.retained
    kv.check()


def test_a_fork_without_room_for_its_tail_shares_nothing():
    kv = KVCacheManager(KVPool(2, 4, 1))
    a = kv.new_seq()
    kv.pool.ledgers[0].append(a, list(range(8)))  # both blocks
    kv.pool.commit()
    kv.prefilled(a, list(range(8)))
    _, shared, copies = kv.start(a, 6)  # a runs: nothing to evict for the tail's block
    assert (shared, copies) == (0, [None])
    with pytest.raises(PoolFull):
        kv.fork(a, kv.new_seq(), 6)
    kv.check()
