"""One ring step: the queries of one rank against the keys of one rank, for a whole batch.

Shared by pass-KV (local queries, visiting keys) and pass-Q (visiting queries, local keys).

Tensor layout inside the ring code is heads-first and token-packed: (H, T, D), sequences one
after the other in the order of :class:`~cp_infer.sharding.ShardLayout`. A sequence's slice is
handed to the kernel as a (1, H, t, D) view, no copy.

A KV prefix (tokens cached by earlier turns, persistent-KV prefill) precedes every new query in
its sequence, so it is always a FULL block whatever the rank: it is attended without mask, cut to
the tokens the owning rank really holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cp_infer.attention.causal import plan_block
from cp_infer.attention.kernels import AttentionKernel
from cp_infer.attention.kv_quant import dequantize_kv
from cp_infer.attention.merge import merge_into_
from cp_infer.sharding import ShardLayout

__all__ = ["DequantizedSegments", "KVPrefix", "attend_step"]


DEQUANT_CHUNK = 4096  # tokens of an FP8 segment dequantized at a time


class DequantizedSegments:
    """FP8 segments of one sequence, yielded as (k, v) blocks in the compute dtype, a chunk of
    tokens at a time (never a whole cache at once)."""

    def __init__(self, segments: list[tuple], dtype: torch.dtype) -> None:
        self.segments, self.dtype = segments, dtype

    def __iter__(self):
        for k, v, ks, vs in self.segments:
            for lo in range(0, k.shape[1], DEQUANT_CHUNK):
                hi = lo + DEQUANT_CHUNK
                yield (
                    dequantize_kv(k[:, lo:hi], ks[:, lo:hi], self.dtype),
                    dequantize_kv(v[:, lo:hi], vs[:, lo:hi], self.dtype),
                )


@dataclass(frozen=True)
class KVPrefix:
    """Cached keys/values that precede the new tokens, sharded over the CP ranks, read in place.

    Which cached tokens a rank holds does not matter to attention (all of them precede every new
    query), only how many. A rank's cached tokens of one sequence may sit in several segments of
    its KV cache (one per turn of a conversation): they are attended segment by segment and
    merged by LSE, so the cache is never re-packed. ``lens[r][j]`` lists the segment lengths of
    sequence ``j`` on CP rank ``r`` and is known on every rank, so a rank can receive another's
    segments (pass-KV) without a size exchange.

    A segment is a heads-first (H_kv, n, D) view of a cache buffer with room for more tokens,
    so it is not one contiguous block, but each head's n tokens are: on the wire a segment is
    its H_kv per-head pieces, sent where they lie and received into one (H_kv, n, D) buffer.

    An FP8 cache (``--kv-dtype fp8_e4m3``) gives float8 segments and (H_kv, n) float32 scales:
    they travel as they are (a quarter of fp32's bytes, half of bf16's, plus the scales) and are
    dequantized to ``dtype`` a chunk at a time where they are attended.

    Args:
        k: per sequence, this rank's segments, each (H_kv, n, D) with contiguous heads.
        v: values, same layout.
        lens: (cp, n_seqs, segments) tokens per CP rank, sequence and segment.
        k_scale, v_scale: per sequence and segment, (H_kv, n) scales of FP8 segments.
        dtype: what FP8 segments are dequantized to (the queries' dtype).
    """

    k: tuple[tuple[torch.Tensor, ...], ...]
    v: tuple[tuple[torch.Tensor, ...], ...]
    lens: tuple[tuple[tuple[int, ...], ...], ...]
    k_scale: tuple[tuple[torch.Tensor, ...], ...] | None = None
    v_scale: tuple[tuple[torch.Tensor, ...], ...] | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        lens = tuple(tuple(tuple(int(n) for n in segs) for segs in row) for row in self.lens)
        object.__setattr__(self, "lens", lens)
        object.__setattr__(self, "k", tuple(tuple(segs) for segs in self.k))
        object.__setattr__(self, "v", tuple(tuple(segs) for segs in self.v))
        if len({len(row) for row in lens}) != 1:
            raise ValueError("KVPrefix.lens must have the same number of sequences for every rank")
        mine = tuple(tuple(t.shape[1] for t in segs) for segs in self.k)
        if mine != tuple(tuple(t.shape[1] for t in segs) for segs in self.v):
            raise ValueError("KVPrefix k and v segments differ in length")
        if mine not in lens:
            raise ValueError(
                f"this rank's prefix segments {mine} match no CP rank's lengths in lens {lens}"
            )
        if self.quantized and (self.v_scale is None or self.dtype is None):
            raise ValueError("an FP8 KVPrefix needs k_scale, v_scale and the dtype to attend in")

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def cp(self) -> int:
        return len(self.lens)

    @property
    def n_seqs(self) -> int:
        return len(self.lens[0])

    def tokens(self, rank: int, seq: int) -> int:
        """Cached tokens of ``seq`` on CP rank ``rank``."""
        return sum(self.lens[rank][seq])

    def _raw(self) -> list[list[tuple]]:
        """Per sequence, this rank's non-empty segments: (k, v) or (k, v, k_scale, v_scale)."""
        out = []
        for j, (ks, vs) in enumerate(zip(self.k, self.v, strict=True)):
            seq = []
            for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
                if k.shape[1]:
                    scales = (self.k_scale[j][i], self.v_scale[j][i]) if self.quantized else ()
                    seq.append((k, v, *scales))
            out.append(seq)
        return out

    def _blocks(self, raw: list[list[tuple]]) -> list:
        if self.quantized:
            return [DequantizedSegments(seq, self.dtype) for seq in raw]
        return raw

    def blocks(self) -> list:
        """Per sequence, this rank's non-empty (k, v) segments, (H_kv, n, D) in the compute
        dtype (FP8 ones dequantized a chunk at a time as they are iterated)."""
        return self._blocks(self._raw())

    def pieces(self) -> list[torch.Tensor]:
        """What travels the ring: every head of every part of every non-empty segment (k, v,
        and the scales of an FP8 cache), as it lies in the cache (each is contiguous)."""
        return [t[h] for seq in self._raw() for seg in seq for t in seg for h in range(len(t))]

    def receive(self, rank: int, like: torch.Tensor) -> tuple[list[torch.Tensor], list]:
        """Buffers for CP rank ``rank``'s :meth:`pieces`: (the pieces to receive into, and
        per sequence the (k, v) segments they fill).

        Args:
            like: an (H_kv, t, D) tensor of the cache's dtype and device (this rank's new K
                as it travels): the buffers' head shape, taken from it rather than from this
                rank's own segments, of which it may have none (a prefix cut short).
        """
        h_kv, d = like.shape[0], like.shape[2]
        pieces, raw = [], []
        for segs in self.lens[rank]:
            seq = []
            for n in segs:
                if n:
                    seg = [torch.empty(h_kv, n, d, dtype=like.dtype, device=like.device)
                           for _ in range(2)]  # fmt: skip
                    if self.quantized:
                        seg += [torch.empty(h_kv, n, dtype=torch.float32, device=like.device)
                                for _ in range(2)]  # fmt: skip
                    pieces += [t[h] for t in seg for h in range(h_kv)]
                    seq.append(tuple(seg))
            raw.append(seq)
        return pieces, self._blocks(raw)

    @staticmethod
    def pack(
        k_per_seq: Sequence[torch.Tensor],
        v_per_seq: Sequence[torch.Tensor],
        lens: Sequence[Sequence[int]],
    ) -> KVPrefix:
        """One segment per sequence from (H_kv, p_j, D) tensors; ``lens`` is (cp, n_seqs)."""
        return KVPrefix(
            tuple((t,) for t in k_per_seq),
            tuple((t,) for t in v_per_seq),
            tuple(tuple((n,) for n in row) for row in lens),
        )


def _call(kernel, q, k, v, causal, scale, acc_out, acc_lse, fresh: bool) -> bool:
    """Run the kernel on (H, t, D) views and merge into (H, t, D) / (H, t) accumulators.

    ``fresh`` accumulators hold nothing yet: the result is copied in, not merged (one pass
    instead of four). Returns whether the rows were written.
    """
    if q.shape[1] == 0 or k.shape[1] == 0:
        return False
    out, lse = kernel(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal, scale)
    if fresh:
        acc_out.copy_(out[0])
        acc_lse.copy_(lse[0])
    else:
        merge_into_(acc_out, acc_lse, out[0], lse[0])
    return True


def attend_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ShardLayout,
    q_rank: int,
    kv_rank: int,
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    *,
    causal: bool,
    kernel: AttentionKernel,
    scale: float | None,
    prefix_blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    fresh: bool = False,
) -> None:
    """Attend the shard of ``q_rank`` to the shard (and prefix) of ``kv_rank``; merge in place.

    Args:
        q: (H, t_local, D) queries held by ``q_rank``.
        k, v: (H_kv, t_local, D) new keys/values held by ``kv_rank``.
        layout: the batch layout (same on every rank).
        acc_out, acc_lse: (H, t_local, D) / (H, t_local) float32 accumulators for ``q``.
        prefix_blocks: per sequence, the (k, v) segments of cached tokens held by ``kv_rank``
            (:meth:`KVPrefix.blocks` or :meth:`KVPrefix.receive`), each (H_kv, n, D).
        fresh: the accumulators are uninitialized: results are written, not merged, and rows
            this step does not reach are set to out = 0, lse = -inf.
    """
    calls = plan_block(q_rank, kv_rank, layout.cp, causal)
    for j in range(layout.n_seqs):
        seq = layout.local_slice(j)
        c = layout.chunk_lens[j]
        qj, kj, vj = q[:, seq], k[:, seq], v[:, seq]
        oj, lj = acc_out[:, seq], acc_lse[:, seq]
        valid = layout.valid_kv_len(j, kv_rank)
        written = [not fresh, not fresh]  # per local query chunk
        for call in calls:
            qs = slice(call.q_start * c, call.q_stop * c)
            ks, ke = call.kv_start * c, call.kv_stop * c
            if not call.causal:
                ke = min(ke, valid)  # padded keys are cut off, never masked
            rows = range(call.q_start, call.q_stop)
            first = not any(written[a] for a in rows)
            assert first or all(written[a] for a in rows), "a call half-covers written rows"
            if _call(kernel, qj[:, qs], kj[:, ks:ke], vj[:, ks:ke], call.causal, scale,
                     oj[:, qs], lj[:, qs], fresh=first):  # fmt: skip
                for a in rows:
                    written[a] = True
        for a in range(2):
            if not written[a]:
                oj[:, a * c : (a + 1) * c].zero_()
                lj[:, a * c : (a + 1) * c].fill_(float("-inf"))
        for pk, pv in prefix_blocks[j] if prefix_blocks is not None else ():
            _call(kernel, qj, pk, pv, False, scale, oj, lj, fresh=False)
