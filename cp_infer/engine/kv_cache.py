"""KV cache sharded across CP ranks; the only code that writes it.

Each CP rank keeps, per sequence, the K/V of the tokens it owns: after a prefill, the real tokens
of its load-balanced shard; during decode, the new tokens placed on it round-robin
(:func:`decode_owner`). No rank ever holds the whole context, and together the ranks hold every
token exactly once. The cache records the position of every token it holds, so a sequence can be
cut at any position (a server reusing a shared prefix).

Storage is a list of segments per sequence, each a preallocated heads-first buffer per layer::

    seq 0:  | turn 1: prefill shard + its decode tokens | turn 2: ... | (free capacity)
            '-- segment 0 (n0 of cap0 used) ------------'-- segment 1 -'

A new turn reserves a new segment, so growth never copies what is cached. The ring reads the
segments in place: each head's used part is one contiguous run that travels as it is
(:class:`~cp_infer.attention.blocks.KVPrefix`), and decode's kernel reads every head's keys
contiguously. On one rank the positions only grow along the
segments (a prefill shard lists its early chunk before its late one, and every turn comes after
the last), which is what makes cutting at a position a matter of shortening segments.

A forward pass writes through a plan: the runner says, before the pass, which of the step's
local tokens each sequence keeps (:meth:`KVCache.plan`); every layer then hands over the K/V of
all its local tokens (:meth:`KVCache.store`), and :meth:`KVCache.commit` makes them permanent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cp_infer.attention.blocks import DequantizedSegments, KVPrefix
from cp_infer.attention.kv_quant import FP8_KV, KV_DTYPES, quantize_kv

__all__ = ["KVCache", "StorePlan", "decode_owner", "decode_tokens_owned"]

logger = logging.getLogger(__name__)

MIN_SEGMENT = 256  # tokens; growth beyond a reservation comes in segments of at least this
MAX_SEGMENTS = 16  # a sequence with more segments is compacted into one (one copy, amortized)


def decode_owner(seq: int, step: int, cp: int) -> int:
    """CP rank that stores the KV of decode step ``step`` of sequence ``seq``.

    The owner moves one rank every step and sequences start one rank apart, so the caches of
    a batch stay balanced within one token per rank (paper §3.4).
    """
    return (seq + step) % cp


def decode_tokens_owned(seq: int, n_steps: int, cp: int, cp_rank: int) -> int:
    """How many of ``n_steps`` decode tokens of ``seq`` land on ``cp_rank``."""
    first = (cp_rank - seq) % cp  # first step this rank owns
    return 0 if first >= n_steps else (n_steps - 1 - first) // cp + 1


@dataclass(frozen=True)
class StorePlan:
    """Which local tokens of one forward pass a sequence keeps on this rank.

    Attributes:
        seq: the sequence (cache slot).
        start: first kept token in the pass's local (T) dimension; they are contiguous.
        positions: position of every kept token in its sequence (host ints, increasing).
        reserve: tokens to make room for when a new segment is opened (at least the kept ones);
            a prefill reserves its decode tokens too, so decode never allocates.
    """

    seq: int
    start: int
    positions: tuple[int, ...]
    reserve: int = 0


@dataclass
class _Segment:
    k: dict[int, torch.Tensor]  # layer -> (H_kv, cap, D)
    v: dict[int, torch.Tensor]
    positions: torch.Tensor  # (cap,) int64 on the host
    k_scale: dict[int, torch.Tensor] | None = None  # layer -> (H_kv, cap) float32 (FP8 cache)
    v_scale: dict[int, torch.Tensor] | None = None
    n: int = 0  # committed tokens
    staged: int = 0  # written by the current pass, not yet committed

    @property
    def capacity(self) -> int:
        return self.positions.shape[0]


@dataclass
class _Sequence:
    segments: list[_Segment] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(s.n for s in self.segments)


class KVCache:
    """This rank's K/V of every sequence, for the layers of this pipeline stage.

    Args:
        layer_ids: layers of this pipeline stage.
        n_kv_heads: local KV heads (after TP).
        head_dim: per-head size.
        dtype: the model's dtype (what attention computes in).
        device: where the cache lives (the model's device).
        kv_dtype: ``"auto"`` stores K/V in ``dtype``; ``"fp8_e4m3"`` in float8 with a float32
            scale per (head, token), quantized once when stored and dequantized a chunk at a
            time when read.
    """

    def __init__(
        self,
        layer_ids: Sequence[int],
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        kv_dtype: str = "auto",
    ) -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose one of {list(KV_DTYPES)}")
        self.layer_ids = list(layer_ids)
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        self.kv_dtype = kv_dtype
        self.fp8 = kv_dtype == "fp8_e4m3"
        self.device = torch.device(device)
        self._seqs: dict[int, _Sequence] = {}
        self._plan: list[tuple[StorePlan, _Segment]] = []

    # -- what is cached ---------------------------------------------------------------------
    def __contains__(self, seq: int) -> bool:
        return seq in self._seqs

    def tokens(self, seq: int) -> int:
        """Committed tokens of ``seq`` on this rank (0 for an unknown sequence)."""
        return self._seqs[seq].n if seq in self._seqs else 0

    def segment_lens(self, seq: int) -> tuple[int, ...]:
        """Committed tokens of ``seq`` per segment, on this rank."""
        return tuple(s.n for s in self._seqs[seq].segments) if seq in self._seqs else ()

    def positions(self, seq: int) -> list[int]:
        """Positions of the tokens of ``seq`` this rank holds, in storage order."""
        if seq not in self._seqs:
            return []
        return [p for s in self._seqs[seq].segments for p in s.positions[: s.n].tolist()]

    def nbytes(self) -> int:
        """Bytes allocated (capacity, not use)."""
        item = 1 if self.fp8 else self.dtype.itemsize
        per_token = (
            2 * len(self.layer_ids) * self.n_kv_heads * (self.head_dim * item + 4 * self.fp8)
        )
        return per_token * sum(s.capacity for q in self._seqs.values() for s in q.segments)

    # -- writing: plan, store per layer, commit ----------------------------------------------
    def plan(self, plans: Sequence[StorePlan]) -> None:
        """Say which local tokens the next forward pass keeps (call before the pass)."""
        assert not self._plan, "commit() the previous pass first"
        for p in plans:
            if not p.positions:
                continue
            seg = self._room(p.seq, len(p.positions), max(p.reserve, len(p.positions)))
            seg.positions[seg.n : seg.n + len(p.positions)] = torch.tensor(
                p.positions, device="cpu"
            )
            seg.staged = len(p.positions)
            self._plan.append((p, seg))

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the planned tokens of one layer's (H_kv, T, D) keys and values."""
        for p, seg in self._plan:
            n = len(p.positions)
            new_k, new_v = k[:, p.start : p.start + n], v[:, p.start : p.start + n]
            if self.fp8:
                (new_k, seg.k_scale[layer][:, seg.n : seg.n + n]) = quantize_kv(new_k)
                (new_v, seg.v_scale[layer][:, seg.n : seg.n + n]) = quantize_kv(new_v)
            seg.k[layer][:, seg.n : seg.n + n] = new_k
            seg.v[layer][:, seg.n : seg.n + n] = new_v

    def commit(self) -> None:
        """Make the tokens stored by the last forward pass permanent (once per pass)."""
        for _, seg in self._plan:
            seg.n += seg.staged
            seg.staged = 0
        self._plan = []

    def abort(self) -> None:
        """Forget the tokens stored by an unfinished pass."""
        for _, seg in self._plan:
            seg.staged = 0
        self._plan = []

    # -- reading ----------------------------------------------------------------------------
    def blocks(self, layer: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(H_kv, n, D) K/V views of ``seq``'s segments, tokens staged by this pass included
        (an FP8 cache yields them dequantized, a chunk at a time)."""
        if seq not in self._seqs:
            return []
        out = []
        for s in self._seqs[seq].segments:
            n = s.n + s.staged
            if n:
                seg = (s.k[layer][:, :n], s.v[layer][:, :n])
                if self.fp8:
                    seg += (s.k_scale[layer][:, :n], s.v_scale[layer][:, :n])
                out.append(seg)
        return DequantizedSegments(out, self.dtype) if self.fp8 else out

    def prefix(self, layer: int, seqs: Sequence[int], lens) -> KVPrefix:
        """The committed K/V of ``seqs`` at ``layer`` as the prefix of a prefill, in place.

        Args:
            lens: (cp, len(seqs), segments) :meth:`segment_lens` of every CP rank.
        """
        k, v, ks, vs = [], [], [], []
        for seq in seqs:
            segs = self._seqs[seq].segments if seq in self._seqs else []
            k.append(tuple(s.k[layer][:, : s.n] for s in segs))
            v.append(tuple(s.v[layer][:, : s.n] for s in segs))
            if self.fp8:
                ks.append(tuple(s.k_scale[layer][:, : s.n] for s in segs))
                vs.append(tuple(s.v_scale[layer][:, : s.n] for s in segs))
        if not self.fp8:
            return KVPrefix(tuple(k), tuple(v), lens)
        return KVPrefix(tuple(k), tuple(v), lens, tuple(ks), tuple(vs), self.dtype)

    # -- managing sequences -----------------------------------------------------------------
    def truncate(self, seq: int, position: int) -> None:
        """Forget every token of ``seq`` at ``position`` or later (keep the shared prefix)."""
        assert not self._plan, "truncate between passes, not during one"
        if seq not in self._seqs:
            return
        kept = []
        for s in self._seqs[seq].segments:
            n = int(torch.searchsorted(s.positions[: s.n], position))
            cut = n < s.n
            if n:
                s.n = n
                kept.append(s)
            if cut:
                break  # positions grow along the segments: nothing later survives
        self._seqs[seq].segments = kept

    def free(self, seq: int) -> None:
        """Drop ``seq`` and its memory."""
        self._seqs.pop(seq, None)

    def _room(self, seq: int, n: int, reserve: int) -> _Segment:
        """The segment that takes ``n`` more tokens of ``seq``: the last one, or a new one."""
        state = self._seqs.setdefault(seq, _Sequence())
        last = state.segments[-1] if state.segments else None
        if last is not None and last.capacity - last.n >= max(n, reserve):
            return last
        if len(state.segments) >= MAX_SEGMENTS:
            self._compact(state, extra=reserve)
            return state.segments[-1]
        seg = self._new_segment(max(reserve, MIN_SEGMENT) if state.segments else reserve)
        state.segments.append(seg)
        return seg

    def _new_segment(self, capacity: int) -> _Segment:
        shape = (self.n_kv_heads, capacity, self.head_dim)
        dtype = FP8_KV if self.fp8 else self.dtype

        def buf(shape=shape, dtype=dtype) -> dict[int, torch.Tensor]:
            return {
                layer: torch.empty(shape, dtype=dtype, device=self.device)
                for layer in self.layer_ids
            }

        scales = (buf(shape[:2], torch.float32), buf(shape[:2], torch.float32)) if self.fp8 else ()
        return _Segment(
            buf(), buf(), torch.empty(capacity, dtype=torch.long, device="cpu"), *scales
        )

    def _compact(self, state: _Sequence, extra: int) -> None:
        """Copy every segment of a sequence into one with room for ``extra`` more tokens."""
        n = state.n
        seg = self._new_segment(n + extra)
        at = 0
        for s in state.segments:
            for layer in self.layer_ids:
                seg.k[layer][:, at : at + s.n] = s.k[layer][:, : s.n]
                seg.v[layer][:, at : at + s.n] = s.v[layer][:, : s.n]
                if self.fp8:
                    seg.k_scale[layer][:, at : at + s.n] = s.k_scale[layer][:, : s.n]
                    seg.v_scale[layer][:, at : at + s.n] = s.v_scale[layer][:, : s.n]
            seg.positions[at : at + s.n] = s.positions[: s.n]
            at += s.n
        seg.n = n
        logger.debug("compacted %d segments (%d tokens) into one", len(state.segments), n)
        state.segments = [seg]
