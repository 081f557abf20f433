"""One step of the engine, described once and read alike by every rank.

A :class:`StepBatch` is what the scheduler hands the model runner: which sequences run, their new
tokens, where those tokens sit in their sequences, how a prefill is sharded over the CP ranks
(:class:`~cp_infer.sharding.ShardLayout`) and with which ring variant, and which CP rank stores
each decode token. Everything a rank needs for its part of the step follows from it by pure
functions of its CP rank (its tokens, their positions, what its KV cache keeps), so the batch is
built the same on every rank and no rank asks another what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from cp_infer.engine.kv_cache import StorePlan
from cp_infer.sharding import ShardLayout, shard

__all__ = ["StepBatch"]


@dataclass(frozen=True)
class StepBatch:
    """The work of one forward pass over every stage and rank.

    Attributes:
        kind: ``"prefill"`` (new tokens sharded load-balanced over CP, ring attention over
            them and the cached prefix) or ``"decode"`` (one token per sequence, on every CP
            rank, KV-cache-parallel attention).
        seqs: the sequences (KV cache slots), in batch order.
        tokens: the new tokens of every sequence (one each for decode).
        starts: the position of every sequence's first new token (its cached tokens).
        cp: the CP size the batch is laid out for.
        device: where the step's tensors go (the model's device).
        layout: prefill only: the load-balanced shard layout of the new tokens.
        variant: prefill only: the ring variant (``"pass-kv"`` or ``"pass-q"``).
        owners: decode only: the CP rank that stores each sequence's token (round robin).
        rank: the CP rank the batch is placed on (its sequences' KV all live there, attention
            is local, and no CP collective runs for it: the other ranks only keep its books);
            None: the batch spans the ring.
    """

    kind: Literal["prefill", "decode"]
    seqs: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    cp: int
    device: torch.device
    layout: ShardLayout | None = None
    variant: str | None = None
    owners: tuple[int, ...] | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        b = len(self.seqs)
        assert len(self.tokens) == b and len(self.starts) == b, "one entry per sequence"
        if self.rank is not None:
            assert 0 <= self.rank < self.cp
            assert self.kind == "decode" or self.layout.cp == 1, "a placed batch is not sharded"
            assert self.owners is None or set(self.owners) == {self.rank}
        if self.kind == "prefill":
            assert self.layout is not None and self.variant is not None
            assert self.layout.seq_lens == tuple(len(t) for t in self.tokens)
        else:
            assert self.owners is not None and len(self.owners) == b
            assert all(len(t) == 1 for t in self.tokens), "decode runs one token per sequence"

    @property
    def n_seqs(self) -> int:
        return len(self.seqs)

    @property
    def n_tokens(self) -> int:
        """New tokens of the step, over all sequences."""
        return sum(len(t) for t in self.tokens)

    @property
    def n_cached(self) -> int:
        """Tokens already cached (over all ranks) for the step's sequences."""
        return sum(self.starts)

    @property
    def placed(self) -> bool:
        """The batch runs on one CP rank (:attr:`rank`), not over the ring."""
        return self.rank is not None

    def _shard_rank(self, cp_rank: int) -> int:
        """Which shard of :attr:`layout` ``cp_rank`` holds (a placed batch's one shard)."""
        assert self.rank is None or cp_rank == self.rank, "a placed batch runs on its rank only"
        return 0 if self.rank is not None else cp_rank

    def local_tokens(self, cp_rank: int) -> torch.Tensor:
        """(T,) the token ids this CP rank runs: its shard (prefill), or every token (decode)."""
        flat = torch.tensor([t for seq in self.tokens for t in seq], dtype=torch.long, device="cpu")
        if self.kind == "decode":
            return flat.to(self.device)
        return shard(flat, self.layout, self._shard_rank(cp_rank)).to(self.device)

    def positions(self, cp_rank: int) -> torch.Tensor:
        """(T,) the position of each of this CP rank's tokens in its sequence."""
        starts = torch.tensor(self.starts, dtype=torch.long, device="cpu")
        if self.kind == "decode":
            return starts.to(self.device)
        offsets = torch.repeat_interleave(
            starts, torch.tensor(self.layout.local_lens, device="cpu")
        )
        return (self.layout.positions(self._shard_rank(cp_rank)) + offsets).to(self.device)

    def store_plans(self, cp_rank: int) -> list[StorePlan]:
        """What this CP rank's KV cache keeps of the step's tokens (see :class:`StorePlan`)."""
        if self.rank is not None and cp_rank != self.rank:
            return []
        plans = []
        shard_rank = self._shard_rank(cp_rank)
        positions = self.layout.positions(shard_rank) if self.kind == "prefill" else None
        for j, seq in enumerate(self.seqs):
            if self.kind == "decode":
                if self.owners[j] == cp_rank:
                    plans.append(StorePlan(seq, j, (self.starts[j],)))
                continue
            # a rank's real tokens are a prefix of its segment (ShardLayout.valid_kv_len)
            n = self.layout.valid_kv_len(j, shard_rank)
            local = positions[self.layout.local_slice(j)][:n]
            plans.append(
                StorePlan(
                    seq, self.layout.local_offsets[j], tuple((local + self.starts[j]).tolist())
                )
            )
        return plans

    def __getstate__(self) -> dict:
        """Pickled (a step plan's batch) without :attr:`all_store_plans`: the receiving rank
        derives them from the rest, and they are as long as the batch's tokens."""
        return {k: v for k, v in self.__dict__.items() if k != "all_store_plans"}

    @cached_property
    def all_store_plans(self) -> list[list[StorePlan]]:
        """:meth:`store_plans` of every CP rank (each rank keeps the books of all; computed
        once per batch: the engine counts the blocks they need, the cache then stores them)."""
        return [self.store_plans(r) for r in range(self.cp)]

    def last_tokens(self, cp_rank: int) -> list[tuple[int, int]]:
        """Prefill: (sequence index, local index) of every last new token this rank holds."""
        assert self.kind == "prefill"
        index = self.layout.gather_index(self._shard_rank(cp_rank))
        where = {t: i for i, t in enumerate(index.tolist()) if t >= 0}
        return [
            (j, where[end - 1])
            for j, end in enumerate(self.layout.seq_offsets[1:])
            if end - 1 in where
        ]
