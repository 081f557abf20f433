"""Which (query chunk, key chunk) pairs a ring step computes, and with which mask.

Every CP rank holds two chunks of each sequence (:func:`cp_infer.sharding.chunk_ids`). When the
queries of rank ``q_rank`` meet the keys of rank ``kv_rank``, each of the 2 x 2 chunk pairs is

- ``FULL``: every key precedes every query (or no causal mask): plain attention;
- ``DIAGONAL``: the same chunk: causal attention on a square block;
- ``SKIP``: every key follows every query: nothing to compute.

:func:`plan_block` turns the 2 x 2 relation matrix into as few kernel calls as it can. For the
load-balanced layout that is always one call::

    kv_rank == q_rank   [[DIAG, SKIP],      one causal call on the whole local block
                         [FULL, DIAG]]
    kv_rank <  q_rank   [[FULL, SKIP],      both query chunks x the early key chunk
                         [FULL, SKIP]]
    kv_rank >  q_rank   [[SKIP, SKIP],      the late query chunk x both key chunks
                         [FULL, FULL]]

so every step costs the same on every rank (half the diagonal step's pairs, twice).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cache

from cp_infer.sharding import chunk_ids

__all__ = ["BlockCall", "ChunkRelation", "chunk_relation", "plan_block"]


class ChunkRelation(enum.Enum):
    FULL = "full"
    DIAGONAL = "diagonal"
    SKIP = "skip"


def chunk_relation(q_chunk: int, kv_chunk: int, causal: bool) -> ChunkRelation:
    """Relation of a query chunk to a key chunk of the same sequence."""
    if not causal or kv_chunk < q_chunk:
        return ChunkRelation.FULL
    if kv_chunk == q_chunk:
        return ChunkRelation.DIAGONAL
    return ChunkRelation.SKIP


@dataclass(frozen=True)
class BlockCall:
    """One kernel call, in units of local chunks (0 = early chunk, 1 = late chunk).

    Attributes:
        q: local query chunks ``[q_start, q_stop)``.
        kv: local key chunks ``[kv_start, kv_stop)``.
        causal: causal mask on the (square) block.
    """

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    causal: bool


def _relations(q_rank: int, kv_rank: int, cp: int, causal: bool) -> list[list[ChunkRelation]]:
    q_chunks, kv_chunks = chunk_ids(q_rank, cp), chunk_ids(kv_rank, cp)
    return [[chunk_relation(a, b, causal) for b in kv_chunks] for a in q_chunks]


def _rectangle(rel: list[list[ChunkRelation]]) -> BlockCall | None:
    """One call if the FULL pairs form a contiguous rectangle and all others are SKIP."""
    full = [(a, b) for a in range(2) for b in range(2) if rel[a][b] is ChunkRelation.FULL]
    if not full or any(rel[a][b] is ChunkRelation.DIAGONAL for a in range(2) for b in range(2)):
        return None
    rows = sorted({a for a, _ in full})
    cols = sorted({b for _, b in full})
    if len(full) != len(rows) * len(cols):
        return None
    return BlockCall(rows[0], rows[-1] + 1, cols[0], cols[-1] + 1, causal=False)


@cache
def plan_block(q_rank: int, kv_rank: int, cp: int, causal: bool) -> tuple[BlockCall, ...]:
    """Kernel calls that compute the queries of ``q_rank`` against the keys of ``kv_rank``.

    Derived from the chunk relations, coalesced where the result is exact: a whole-block
    causal call when the block is [[DIAG, SKIP], [FULL, DIAG]], one rectangle when the
    FULL pairs form one, and one call per non-skipped pair otherwise.
    """
    rel = _relations(q_rank, kv_rank, cp, causal)
    F, D, S = ChunkRelation.FULL, ChunkRelation.DIAGONAL, ChunkRelation.SKIP
    if rel == [[D, S], [F, D]]:
        return (BlockCall(0, 2, 0, 2, causal=True),)
    rect = _rectangle(rel)
    if rect is not None:
        return (rect,)
    return tuple(
        BlockCall(a, a + 1, b, b + 1, causal=rel[a][b] is D)
        for a in range(2)
        for b in range(2)
        if rel[a][b] is not S
    )
