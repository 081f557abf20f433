"""The KV pool's bookkeeping: fixed-size blocks, who holds them, and where each token sits.

Every rank's KV memory is one pool of ``n_blocks`` blocks of ``block_size`` token slots (the
tensors live in :class:`~cp_infer.engine.kv_cache.KVCache`). A sequence holds a *block table*,
its blocks in token order; its tokens fill them from the first slot on, so every block but the
last is full. Blocks are reference-counted: a sequence that shares a prefix with another holds
the same blocks (:meth:`BlockLedger.fork`), and a block returns to the free list when its last
holder lets go.

This module is host-side arithmetic, no tensors of K/V. Every rank keeps a :class:`BlockLedger`
for *every* CP rank (a :class:`KVPool`), and runs the same operations on all of them in the same
order: each rank knows how full every other rank's pool is without asking, so admission and
preemption are decided alike everywhere, and the lengths a ring step needs of a peer's prefix
are known locally.

Contiguity. A ring step sends each head of a prefix as it lies in memory, so what matters is
how many *runs* of consecutive slots a table has, not how many blocks. The allocator keeps the
free blocks as extents (runs of consecutive ids), grows a sequence into the block right after
its last one when that is free, and otherwise takes the first extent that holds the whole
request: a sequence prefilled into an idle pool is one run however many blocks it spans.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from cp_infer.engine.sizing import blocks_for_tokens
from cp_infer.sharding import span_positions

__all__ = ["BlockLedger", "KVPool", "PoolFull", "Table", "blocks_for_tokens"]


class PoolFull(RuntimeError):
    """The pool has fewer free blocks than an operation needs (the engine checks before)."""


def _extend(runs: list[tuple[int, int]], slot: int, n: int) -> None:
    """Add ``n`` slots from ``slot`` to ``runs`` of (first slot, count): to the last run if they
    follow it, else as a run of their own."""
    if runs and runs[-1][0] + runs[-1][1] == slot:
        runs[-1] = (runs[-1][0], runs[-1][1] + n)
    else:
        runs.append((slot, n))


class _Extents:
    """Free block ids as sorted, disjoint runs ``[start, start + length)``."""

    def __init__(self, n: int) -> None:
        self.starts: list[int] = [0] if n else []
        self.lengths: list[int] = [n] if n else []
        self.total = n

    def take_at(self, block: int, most: int) -> list[int]:
        """Up to ``most`` free blocks from ``block`` on, if ``block`` is free."""
        i = bisect.bisect_right(self.starts, block) - 1
        if i < 0 or block >= self.starts[i] + self.lengths[i]:
            return []
        start, length = self.starts[i], self.lengths[i]
        n = min(most, start + length - block)
        # split [start, block) | [block, block + n) | [block + n, start + length)
        head, tail = block - start, start + length - block - n
        del self.starts[i], self.lengths[i]
        if tail:
            self.starts.insert(i, block + n)
            self.lengths.insert(i, tail)
        if head:
            self.starts.insert(i, start)
            self.lengths.insert(i, head)
        self.total -= n
        return list(range(block, block + n))

    def take(self, n: int) -> list[int]:
        """``n`` free blocks: the first run that holds them all, else the longest runs."""
        if n > self.total:
            raise PoolFull(f"{n} blocks asked, {self.total} free")
        out: list[int] = []
        while len(out) < n:
            need = n - len(out)
            fit = next((i for i, length in enumerate(self.lengths) if length >= need), None)
            i = (
                fit
                if fit is not None
                else max(range(len(self.lengths)), key=self.lengths.__getitem__)
            )
            out += self.take_at(self.starts[i], need)
        return out

    def give(self, blocks: Iterable[int]) -> None:
        for b in sorted(blocks):
            i = bisect.bisect_right(self.starts, b)
            left = i > 0 and self.starts[i - 1] + self.lengths[i - 1] == b
            right = i < len(self.starts) and self.starts[i] == b + 1
            if left and right:
                self.lengths[i - 1] += 1 + self.lengths[i]
                del self.starts[i], self.lengths[i]
            elif left:
                self.lengths[i - 1] += 1
            elif right:
                self.starts[i] -= 1
                self.lengths[i] += 1
            else:
                self.starts.insert(i, b)
                self.lengths.insert(i, 1)
            self.total += 1


@dataclass
class Table:
    """One sequence's blocks on one rank, in token order.

    Attributes:
        blocks: block ids; token ``i`` sits in slot ``i % block_size`` of ``blocks[i //
            block_size]``.
        n: committed tokens.
        staged: tokens written by the current forward pass, not yet committed.
        live: the sequence runs (its blocks cannot be reclaimed); False once it is only
            retained for reuse.
    """

    blocks: list[int] = field(default_factory=list)
    n: int = 0
    staged: int = 0
    live: bool = True


class BlockLedger:
    """One rank's pool: free blocks, reference counts, block tables and token positions.

    Args:
        n_blocks: blocks in the pool.
        block_size: token slots per block.
    """

    def __init__(self, n_blocks: int, block_size: int) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs >= 1 block of >= 1 token, got {n_blocks} x "
                             f"{block_size}")  # fmt: skip
        self.n_blocks, self.block_size = n_blocks, block_size
        self.refs = [0] * n_blocks
        self.live_refs = [0] * n_blocks  # references from sequences that run
        self.reclaimable = 0  # held, but only by retained sequences
        self._free = _Extents(n_blocks)
        # the position in its sequence of the token in every slot (host: cut points are found
        # by binary search over a table's slots)
        self.positions = torch.empty(n_blocks * block_size, dtype=torch.long, device="cpu")
        self.tables: dict[int, Table] = {}
        self._staged: set[int] = set()  # sequences the current pass wrote to

    # -- what is held -------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        return self._free.total

    def tokens(self, seq: int) -> int:
        return self.tables[seq].n if seq in self.tables else 0

    def slot(self, table: Table, i: int) -> int:
        return table.blocks[i // self.block_size] * self.block_size + i % self.block_size

    def runs(self, seq: int, staged: bool = False) -> list[tuple[int, int]]:
        """(first slot, tokens) of every run of consecutive slots holding ``seq``'s committed
        tokens (and the staged ones), in token order."""
        table = self.tables.get(seq)
        if table is None:
            return []
        n = table.n + (table.staged if staged else 0)
        out: list[tuple[int, int]] = []
        bs = self.block_size
        for i, b in enumerate(table.blocks[: -(-n // bs)]):
            _extend(out, b * bs, min(bs, n - i * bs))
        return out

    def positions_of(self, seq: int, staged: bool = False) -> list[int]:
        """Positions of ``seq``'s committed tokens (and the staged ones), in storage order."""
        runs = self.runs(seq, staged)
        return [p for s, n in runs for p in self.positions[s : s + n].tolist()]

    def count_below(self, seq: int, position: int) -> int:
        """How many of ``seq``'s committed tokens have a position below ``position`` (they come
        first: on one rank the positions grow along a table)."""
        table = self.tables.get(seq)
        if table is None:
            return 0
        return bisect.bisect_left(
            range(table.n), position, key=lambda i: int(self.positions[self.slot(table, i)])
        )

    # -- how much room ------------------------------------------------------------------------
    def blocks_for(self, seq: int, k: int) -> int:
        """New blocks ``seq`` needs to take ``k`` more tokens (its last block's free slots
        first: a table's last block is its own)."""
        table = self.tables.get(seq)
        room = len(table.blocks) * self.block_size - table.n - table.staged if table else 0
        return max(0, -(-(k - room) // self.block_size))

    # -- writing ------------------------------------------------------------------------------
    def append(self, seq: int, positions: Sequence[int]) -> list[tuple[int, int]]:
        """Stage ``positions`` as ``seq``'s next tokens; returns (first slot, tokens) runs where
        they go, in order. Raises :class:`PoolFull` (changing nothing) without the room."""
        k = len(positions)
        need = self.blocks_for(seq, k)
        if need > self.n_free:
            raise PoolFull(f"sequence {seq} needs {need} blocks, {self.n_free} free")
        table = self.tables.setdefault(seq, Table())
        if need:
            new = self._free.take_at(table.blocks[-1] + 1, need) if table.blocks else []
            new += self._free.take(need - len(new))
            for b in new:
                self._ref(b, +1, table.live)
            table.blocks += new
        first = table.n + table.staged
        out: list[tuple[int, int]] = []
        i = 0
        while i < k:
            slot = self.slot(table, first + i)
            take = min(k - i, self.block_size - (first + i) % self.block_size)
            _extend(out, slot, take)
            i += take
        at = 0
        for slot, n in out:
            self.positions[slot : slot + n] = torch.tensor(positions[at : at + n], device="cpu")
            at += n
        table.staged += k
        self._staged.add(seq)
        return out

    def commit(self) -> None:
        for seq in self._staged:
            table = self.tables[seq]
            table.n += table.staged
            table.staged = 0
        self._staged.clear()

    def abort(self) -> None:
        """Forget staged tokens, and the blocks taken for them alone."""
        for seq in self._staged:
            table = self.tables[seq]
            table.staged = 0
            keep = -(-table.n // self.block_size)
            if len(table.blocks) > keep:
                self._release(table.blocks[keep:], table.live)
                del table.blocks[keep:]
            if not table.n:  # started by this pass: as if never seen
                del self.tables[seq]
        self._staged.clear()

    def fork(self, src: int, dst: int, n: int) -> tuple[int, int, int] | None:
        """Start ``dst`` with the first ``n`` committed tokens of ``src``: their full blocks
        are shared, the tokens of a partly shared block are copied into a block of ``dst``'s
        own. Returns that copy as (source slot, destination slot, tokens), or None.

        Raises :class:`PoolFull` (changing nothing) when the copy has no block to go to.
        """
        assert dst not in self.tables, f"sequence {dst} already holds blocks"
        if n == 0:  # nothing of src on this rank below the cut (a short prefix lives on one)
            return None
        source = self.tables[src]
        assert n <= source.n
        full, tail = divmod(n, self.block_size)
        if tail and not self.n_free:
            raise PoolFull(f"no free block for the {tail} tokens of a partly shared block")
        table = self.tables[dst] = Table(blocks=source.blocks[:full], n=n)
        for b in table.blocks:
            self._ref(b, +1, True)
        if not tail:
            return None
        (b,) = self._free.take(1)
        self._ref(b, +1, True)
        table.blocks.append(b)
        src_slot, dst_slot = source.blocks[full] * self.block_size, b * self.block_size
        self.positions[dst_slot : dst_slot + tail] = self.positions[src_slot : src_slot + tail]
        return src_slot, dst_slot, tail

    def free(self, seq: int) -> None:
        assert seq not in self._staged, "free between passes, not during one"
        table = self.tables.pop(seq, None)
        if table is not None:
            self._release(table.blocks, table.live)

    def set_live(self, seq: int, live: bool) -> None:
        """Mark ``seq`` running (its blocks are not reclaimable) or only retained."""
        table = self.tables.get(seq)
        if table is None or table.live == live:
            return
        for b in table.blocks:
            self._ref(b, -1, table.live)
        table.live = live
        for b in table.blocks:
            self._ref(b, +1, live)

    def check(self) -> None:
        """Assert the books add up: every block is free or held, once; the reference counts
        are the tables' (a test's and a debugger's view; O(blocks))."""
        refs, live = [0] * self.n_blocks, [0] * self.n_blocks
        for table in self.tables.values():
            assert len(table.blocks) == -(-(table.n + table.staged) // self.block_size)
            for b in table.blocks:
                refs[b] += 1
                live[b] += table.live
        assert refs == self.refs and live == self.live_refs, "reference counts drifted"
        free = {b for s, n in zip(self._free.starts, self._free.lengths, strict=True)
                for b in range(s, s + n)}  # fmt: skip
        assert len(free) == self.n_free, "free runs overlap"
        assert all((refs[b] == 0) == (b in free) for b in range(self.n_blocks)), "a block leaked"
        assert self.reclaimable == sum(r > 0 and lv == 0 for r, lv in zip(refs, live, strict=True))

    # -- reference counts ---------------------------------------------------------------------
    def _ref(self, b: int, d: int, live: bool) -> None:
        was = self.refs[b] > 0 and self.live_refs[b] == 0
        self.refs[b] += d
        if live:
            self.live_refs[b] += d
        now = self.refs[b] > 0 and self.live_refs[b] == 0
        self.reclaimable += now - was
        assert self.refs[b] >= 0 and self.live_refs[b] >= 0

    def _release(self, blocks: Iterable[int], live: bool) -> None:
        gone = []
        for b in blocks:
            self._ref(b, -1, live)
            if self.refs[b] == 0:
                gone.append(b)
        self._free.give(gone)


class KVPool:
    """The ledgers of every CP rank's pool, run alike on every rank (see the module docstring).

    Args:
        n_blocks: blocks per rank (the same on every rank: the smallest any rank can hold).
        block_size: token slots per block.
        cp: context-parallel size.
    """

    def __init__(self, n_blocks: int, block_size: int, cp: int = 1) -> None:
        self.n_blocks, self.block_size, self.cp = n_blocks, block_size, cp
        self.ledgers = [BlockLedger(n_blocks, block_size) for _ in range(cp)]

    @property
    def tokens(self) -> int:
        """Token slots per rank."""
        return self.n_blocks * self.block_size

    def free_blocks(self) -> list[int]:
        return [g.n_free for g in self.ledgers]

    def available(self) -> int:
        """Blocks the fullest rank can still give: free, or held only by retained sequences."""
        return min(g.n_free + g.reclaimable for g in self.ledgers)

    def used_blocks(self) -> int:
        """Blocks held on the fullest rank."""
        return self.n_blocks - min(self.free_blocks())

    def usage(self) -> float:
        """Fraction of the fullest rank's blocks that are held."""
        return self.used_blocks() / self.n_blocks

    def deficit(self, needs: Sequence[int]) -> int:
        """Blocks missing on the worst rank for ``needs[r]`` new blocks on rank ``r``."""
        return max(n - g.n_free for n, g in zip(needs, self.ledgers, strict=True))

    def blocks_for_tokens(self, tokens: int) -> int:
        """:func:`blocks_for_tokens` in this pool."""
        return blocks_for_tokens(tokens, self.cp, self.block_size)

    def spread(self, seq: int, n: int) -> None:
        """Book ``n`` tokens of ``seq`` (positions 0 to ``n``) on every rank as a prefill of
        them over the CP ranks would lay them out (:func:`~cp_infer.sharding.span_positions`),
        committed. Raises :class:`PoolFull` without the room (check :meth:`spread_needs`)."""
        for r, ledger in enumerate(self.ledgers):
            positions = span_positions(0, n, self.cp, r)
            if positions:
                ledger.append(seq, positions)
        self.commit()

    def spread_needs(self, n: int) -> list[int]:
        """New blocks each rank gives :meth:`spread` of ``n`` tokens."""
        return [blocks_for_tokens(len(span_positions(0, n, self.cp, r)), 1, self.block_size)
                for r in range(self.cp)]  # fmt: skip

    def fork(self, src: int, dst: int, position: int) -> list[tuple[int, int, int] | None]:
        """Start ``dst`` with ``src``'s tokens below ``position`` on every rank; returns each
        rank's tail copy (see :meth:`BlockLedger.fork`)."""
        counts = [g.count_below(src, position) for g in self.ledgers]
        if any(n % self.block_size for n in counts) and not all(
            g.n_free for g, n in zip(self.ledgers, counts, strict=True) if n % self.block_size
        ):
            raise PoolFull("no free block for a partly shared block's tail")
        return [g.fork(src, dst, n) for g, n in zip(self.ledgers, counts, strict=True)]

    def free(self, seq: int) -> None:
        for g in self.ledgers:
            g.free(seq)

    def set_live(self, seq: int, live: bool) -> None:
        for g in self.ledgers:
            g.set_live(seq, live)

    def commit(self) -> None:
        for g in self.ledgers:
            g.commit()

    def abort(self) -> None:
        for g in self.ledgers:
            g.abort()

    def lens(self, seqs: Sequence[int]) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """(cp, len(seqs), runs) committed tokens per rank, sequence and run: what a ring step
        needs to receive a peer's prefix."""
        return tuple(tuple(tuple(n for _, n in g.runs(seq)) for seq in seqs) for g in self.ledgers)
