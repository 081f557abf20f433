"""Load-balanced context-parallel sharding of variable-length batches.

With ``cp`` ranks, every sequence is padded to a multiple of ``2 * cp`` tokens and cut into
``2 * cp`` equal chunks; CP rank ``i`` holds chunks ``i`` and ``2 * cp - 1 - i`` (paper §3.2).
Under a causal mask this gives every rank the same attention work::

    sequence  |c0|c1|c2|c3|      cp = 2, 4 chunks
    rank 0    |c0|        |c3|   early + late chunk
    rank 1       |c1|c2|         the two middle chunks

A batch of several sequences (cu_seqlens style, packed along the token dimension) is sharded
sequence by sequence, and each rank packs its pieces in sequence order. Because each sequence is
padded to a multiple of ``2 * cp``, every rank holds exactly the same number of tokens for every
sequence, so ring messages have one shape on all ranks.

Padding sits at the end of each sequence. Under a causal mask real queries never see it; without
one, the attention code cuts the padded keys off (see :meth:`ShardLayout.valid_kv_len`). Padded
query rows are computed and dropped by :func:`unshard`.

Everything here is a pure function of the lengths: no process groups, no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch

__all__ = [
    "ShardLayout",
    "chunk_ids",
    "shard",
    "span_positions",
    "unshard",
]


def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two chunk indices (of ``2 * cp``) that ``cp_rank`` holds, in increasing order."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} is out of range for cp={cp}")
    return cp_rank, 2 * cp - 1 - cp_rank


@dataclass(frozen=True)
class ShardLayout:
    """Where every token of a variable-length batch lives across ``cp`` ranks.

    Args:
        seq_lens: real length of every sequence in the batch (all >= 1).
        cp: context-parallel size.

    Attributes:
        chunk_lens: tokens per chunk, per sequence (``ceil(L / (2 * cp))``).
        local_lens: tokens per rank, per sequence (``2 * chunk_len``, padding included).
        local_offsets: start of each sequence in a rank's packed shard (length ``n_seqs + 1``).
        t_local: tokens in a rank's packed shard (the same on every rank).
    """

    seq_lens: tuple[int, ...]
    cp: int
    chunk_lens: tuple[int, ...] = field(init=False)
    local_lens: tuple[int, ...] = field(init=False)
    local_offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seq_lens", tuple(int(n) for n in self.seq_lens))
        if self.cp < 1:
            raise ValueError(f"cp must be >= 1, got {self.cp}")
        if not self.seq_lens:
            raise ValueError("the batch is empty: pass at least one sequence")
        bad = [i for i, n in enumerate(self.seq_lens) if n < 1]
        if bad:
            raise ValueError(
                f"sequences {bad} are empty (lengths {[self.seq_lens[i] for i in bad]}); "
                "every prompt needs at least one token"
            )
        n_chunks = 2 * self.cp
        chunk_lens = tuple(-(-n // n_chunks) for n in self.seq_lens)
        local_lens = tuple(2 * c for c in chunk_lens)
        object.__setattr__(self, "chunk_lens", chunk_lens)
        object.__setattr__(self, "local_lens", local_lens)
        object.__setattr__(self, "local_offsets", (0, *accumulate(local_lens)))

    # -- sizes ------------------------------------------------------------------------------
    @property
    def n_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def t_local(self) -> int:
        return self.local_offsets[-1]

    @property
    def total_tokens(self) -> int:
        """Real tokens in the unsharded packed batch."""
        return sum(self.seq_lens)

    @property
    def seq_offsets(self) -> tuple[int, ...]:
        """cu_seqlens of the unsharded packed batch."""
        return (0, *accumulate(self.seq_lens))

    def local_slice(self, seq: int) -> slice:
        """Tokens of sequence ``seq`` in a rank's packed shard."""
        return slice(self.local_offsets[seq], self.local_offsets[seq + 1])

    # -- per rank ---------------------------------------------------------------------------
    def positions(self, cp_rank: int) -> torch.Tensor:
        """Position ids (within each sequence) of a rank's packed shard, padding included.

        Returns:
            (t_local,) int64. Padded tokens get positions >= their sequence length.
        """
        parts = []
        for c in self.chunk_lens:
            for chunk in chunk_ids(cp_rank, self.cp):
                parts.append(torch.arange(chunk * c, (chunk + 1) * c, device="cpu"))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device="cpu")

    def valid_mask(self, cp_rank: int) -> torch.Tensor:
        """(t_local,) bool: True for real tokens, False for padding."""
        lens = torch.tensor(self.local_lens, device="cpu")
        seq_len_per_token = torch.repeat_interleave(torch.tensor(self.seq_lens, device="cpu"), lens)
        return self.positions(cp_rank) < seq_len_per_token

    def gather_index(self, cp_rank: int) -> torch.Tensor:
        """Index into the unsharded packed batch for each local token; -1 for padding."""
        lens = torch.tensor(self.local_lens, device="cpu")
        starts = torch.repeat_interleave(torch.tensor(self.seq_offsets[:-1], device="cpu"), lens)
        pos = self.positions(cp_rank)
        index = starts + pos
        return torch.where(self.valid_mask(cp_rank), index, torch.full_like(index, -1))

    def valid_kv_len(self, seq: int, cp_rank: int) -> int:
        """Real tokens of sequence ``seq`` in ``cp_rank``'s shard.

        They always form a prefix of the rank's ``local_lens[seq]`` tokens: the late chunk
        ``2cp-1-i`` only holds real tokens when the early chunk ``i`` is full.
        """
        c, n = self.chunk_lens[seq], self.seq_lens[seq]
        early, late = chunk_ids(cp_rank, self.cp)
        return min(c, max(0, n - early * c)) + min(c, max(0, n - late * c))


def span_positions(start: int, stop: int, cp: int, cp_rank: int) -> list[int]:
    """The positions of ``[start, stop)`` that ``cp_rank`` keeps when those tokens are one
    sequence's prefill (a CP engine's cache after it), increasing: what a decode tier with CP
    holds of a hand-off (:meth:`cp_infer.engine.core.EngineCore.adopt`)."""
    if stop <= start:
        return []
    layout = ShardLayout([stop - start], cp)
    local = layout.positions(cp_rank)[: layout.valid_kv_len(0, cp_rank)]
    return (local + start).tolist()


def shard(x: torch.Tensor, layout: ShardLayout, cp_rank: int, dim: int = 0) -> torch.Tensor:
    """This rank's load-balanced shard of a packed batch.

    Args:
        x: unsharded packed batch, ``layout.total_tokens`` long along ``dim``.
        layout: the batch's :class:`ShardLayout`.
        cp_rank: rank within the CP group.
        dim: the token dimension.

    Returns:
        ``layout.t_local`` tokens along ``dim``; padded tokens are zeros.
    """
    if x.shape[dim] != layout.total_tokens:
        raise ValueError(
            f"x has {x.shape[dim]} tokens along dim {dim} but the layout describes "
            f"{layout.total_tokens} (seq_lens={layout.seq_lens})"
        )
    index = layout.gather_index(cp_rank).to(x.device)
    valid = index >= 0
    out = x.index_select(dim, index.clamp(min=0))
    shape = [1] * x.dim()
    shape[dim] = -1
    return out * valid.view(shape).to(out.dtype) if not valid.all() else out


def unshard(shards: Sequence[torch.Tensor], layout: ShardLayout, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`shard`: reassemble the packed batch from every rank's shard.

    Args:
        shards: one tensor per CP rank, in CP-rank order, ``layout.t_local`` long along ``dim``.
        layout: the batch's :class:`ShardLayout`.
        dim: the token dimension.
    """
    if len(shards) != layout.cp:
        raise ValueError(f"expected {layout.cp} shards (one per CP rank), got {len(shards)}")
    ref = shards[0]
    shape = list(ref.shape)
    shape[dim] = layout.total_tokens
    out = ref.new_empty(shape)
    for cp_rank, s in enumerate(shards):
        index = layout.gather_index(cp_rank).to(s.device)
        valid = index >= 0
        out.index_copy_(dim, index[valid], s.index_select(dim, valid.nonzero().squeeze(1)))
    return out
