"""KV cache sharded across CP ranks; the only code that writes it.

Each CP rank keeps, per sequence, the K/V of the tokens it owns: after a prefill, the real tokens
of its load-balanced shard; during decode, the new tokens placed on it round-robin
(:func:`decode_owner`). No rank ever holds the whole context, and together the ranks hold every
token exactly once. The cache records the position of every token it holds, so a sequence can
start from any prefix of another (a server reusing a shared prefix).

Storage is one pool per rank, allocated once and cut into blocks of token slots
(:mod:`cp_infer.engine.kv_pool` keeps the books)::

    K (and V), per layer:  (H_kv, n_blocks * block_size, D)
                            | b0 | b1 | b2 | b3 | b4 | b5 | ...
    seq 7's table [1, 2, 3]:    '--------------'           one run: each head's tokens contiguous
    seq 9's table [1, 2, 5]:    '---------'   '--'         shares b1, b2 with seq 7; b5 its own

A sequence's tokens fill its blocks in token order. The ring and decode read them in place, a
*run* of consecutive blocks at a time: each head's part of a run is one contiguous piece that
travels as it is (:class:`~cp_infer.attention.blocks.KVPrefix`), and decode's kernel reads every
head's keys contiguously. On one rank the positions only grow along a table (a prefill shard
lists its early chunk before its late one, and every turn comes after the last), which is what
makes sharing a prefix a matter of sharing the first blocks of a table.

A forward pass writes through a plan: the runner says, before the pass, which of the step's
local tokens each sequence keeps on every CP rank (:meth:`KVCache.plan`: the books of every rank
are kept alike everywhere); every layer then hands over the K/V of all its local tokens
(:meth:`KVCache.store`), and :meth:`KVCache.commit` makes them permanent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cp_infer.attention.blocks import DequantizedSegments, KVPrefix
from cp_infer.attention.kv_quant import FP8_KV, KV_DTYPES, dequantize_kv, quantize_kv
from cp_infer.engine.kv_pool import KVPool, PoolFull

__all__ = [
    "DEFAULT_BLOCK_SIZE", "KVCache", "StorePlan", "decode_owner", "decode_tokens_owned",
]  # fmt: skip

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 64  # token slots per block


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
    """Which local tokens of one forward pass a sequence keeps on one rank.

    Attributes:
        seq: the sequence.
        start: first kept token in the pass's local (T) dimension; they are contiguous.
        positions: position of every kept token in its sequence (host ints, increasing).
    """

    seq: int
    start: int
    positions: tuple[int, ...]


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
        pool: the books of every CP rank's pool (:class:`~cp_infer.engine.kv_pool.KVPool`);
            default: a pool of its own for one rank, of ``tokens`` slots.
        cp_rank: which of the pool's ranks this cache stores.
        tokens: slots of the default pool (rounded up to whole blocks).
        block_size: slots per block of the default pool.
    """

    def __init__(
        self, layer_ids: Sequence[int], n_kv_heads: int, head_dim: int, dtype: torch.dtype,
        device: torch.device | str = "cpu", kv_dtype: str = "auto", *,
        pool: KVPool | None = None, cp_rank: int = 0, tokens: int = 65536,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:  # fmt: skip
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose one of {list(KV_DTYPES)}")
        self.layer_ids = list(layer_ids)
        self._layer = {layer: i for i, layer in enumerate(self.layer_ids)}
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        self.kv_dtype = kv_dtype
        self.fp8 = kv_dtype == "fp8_e4m3"
        self.device = torch.device(device)
        self.pool = pool or KVPool(-(-tokens // block_size), block_size)
        self.cp_rank = cp_rank
        self.ledger = self.pool.ledgers[cp_rank]
        shape = (len(self.layer_ids), n_kv_heads, self.pool.tokens, head_dim)
        kind = FP8_KV if self.fp8 else dtype
        # allocated once: the pool is the limit (on a CPU host the pages are taken as written)
        self.k = torch.empty(shape, dtype=kind, device=self.device)
        self.v = torch.empty(shape, dtype=kind, device=self.device)
        self.k_scale = self.v_scale = None
        if self.fp8:
            self.k_scale = torch.empty(shape[:3], dtype=torch.float32, device=self.device)
            self.v_scale = torch.empty(shape[:3], dtype=torch.float32, device=self.device)
        self._plan: list[tuple[StorePlan, list[tuple[int, int]]]] = []
        logger.debug(
            "KV pool: %d blocks of %d tokens, %.1f MiB", self.pool.n_blocks,
            self.pool.block_size, self.nbytes() / 2**20,
        )  # fmt: skip

    # -- what is cached ---------------------------------------------------------------------
    def __contains__(self, seq: int) -> bool:
        return seq in self.ledger.tables

    def tokens(self, seq: int) -> int:
        """Committed tokens of ``seq`` on this rank (0 for an unknown sequence)."""
        return self.ledger.tokens(seq)

    def segment_lens(self, seq: int) -> tuple[int, ...]:
        """Committed tokens of ``seq`` per run of consecutive slots, on this rank."""
        return tuple(n for _, n in self.ledger.runs(seq))

    def positions(self, seq: int, staged: bool = False) -> list[int]:
        """Positions of the tokens of ``seq`` this rank holds (and those this pass staged), in
        storage order."""
        return self.ledger.positions_of(seq, staged)

    def nbytes(self) -> int:
        """Bytes of the pool (allocated once: capacity, not use)."""
        scales = (self.k_scale.nbytes + self.v_scale.nbytes) if self.fp8 else 0
        return self.k.nbytes + self.v.nbytes + scales

    # -- writing: plan, store per layer, commit ----------------------------------------------
    def plan(self, by_rank: Sequence[Sequence[StorePlan]]) -> None:
        """Say which local tokens the next forward pass keeps on every CP rank (call before
        the pass, on every rank alike: ``by_rank[r]`` are rank r's plans).

        Raises:
            PoolFull: a rank has no room (nothing is kept); the engine makes room first.
        """
        assert not self._plan, "commit() the previous pass first"
        assert len(by_rank) == self.pool.cp, "one list of plans per CP rank"
        try:
            for r, plans in enumerate(by_rank):
                for p in plans:
                    if p.positions:
                        runs = self.pool.ledgers[r].append(p.seq, p.positions)
                        if r == self.cp_rank:
                            self._plan.append((p, runs))
        except PoolFull:
            self.abort()
            raise

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor,
        scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        """Keep the planned tokens of one layer's (H_kv, T, D) keys and values.

        Args:
            scales: (H_kv, T) K and V scales of FP8 ``k`` and ``v`` (another FP8 cache's, a
                hand-off's): stored as they are, not quantized again.
        """
        li = self._layer[layer]
        if scales is not None and not self.fp8:
            raise ValueError("FP8 K/V with scales go into an FP8 cache only (kv_dtype fp8_e4m3)")
        for p, runs in self._plan:
            n = len(p.positions)
            new_k, new_v = k[:, p.start : p.start + n], v[:, p.start : p.start + n]
            if scales is not None:
                k_scale, v_scale = (x[:, p.start : p.start + n] for x in scales)
            elif self.fp8:
                new_k, k_scale = quantize_kv(new_k)
                new_v, v_scale = quantize_kv(new_v)
            at = 0
            for slot, m in runs:
                self.k[li, :, slot : slot + m] = new_k[:, at : at + m]
                self.v[li, :, slot : slot + m] = new_v[:, at : at + m]
                if self.fp8:
                    self.k_scale[li, :, slot : slot + m] = k_scale[:, at : at + m]
                    self.v_scale[li, :, slot : slot + m] = v_scale[:, at : at + m]
                at += m

    def commit(self) -> None:
        """Make the tokens stored by the last forward pass permanent (once per pass)."""
        self.pool.commit()
        self._plan = []

    def abort(self) -> None:
        """Forget the tokens stored by an unfinished pass."""
        self.pool.abort()
        self._plan = []

    # -- reading ----------------------------------------------------------------------------
    def _views(self, li: int, runs: list[tuple[int, int]]) -> list[tuple]:
        out = []
        for s, n in runs:
            seg = (self.k[li, :, s : s + n], self.v[li, :, s : s + n])
            if self.fp8:
                seg += (self.k_scale[li, :, s : s + n], self.v_scale[li, :, s : s + n])
            out.append(seg)
        return out

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_kv, len(index), D) copies of the K and V in slots ``index`` at ``layer``, in the
        compute dtype (an FP8 cache's dequantized)."""
        li = self._layer[layer]
        k, v = self.k[li].index_select(1, index), self.v[li].index_select(1, index)
        if self.fp8:
            k = dequantize_kv(k, self.k_scale[li].index_select(1, index), self.dtype)
            v = dequantize_kv(v, self.v_scale[li].index_select(1, index), self.dtype)
        return k, v

    def blocks(self, layer: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(H_kv, n, D) K/V views of ``seq``'s runs, tokens staged by this pass included (an
        FP8 cache yields them dequantized, a chunk at a time)."""
        out = self._views(self._layer[layer], self.ledger.runs(seq, staged=True))
        return DequantizedSegments(out, self.dtype) if self.fp8 else out

    def raw(self, layer: int, seq: int, staged: bool = False) -> tuple[torch.Tensor, ...]:
        """The committed (H_kv, n, D) K and V of ``seq`` on this rank (and those this pass
        staged), as stored (FP8 with their (H_kv, n) scales after them), in :meth:`positions`
        order: one copy."""
        segs = self._views(self._layer[layer], self.ledger.runs(seq, staged))
        return tuple(torch.cat(parts, dim=1) for parts in zip(*segs, strict=True))

    def prefix(self, layer: int, seqs: Sequence[int], lens) -> KVPrefix:
        """The committed K/V of ``seqs`` at ``layer`` as the prefix of a prefill, in place.

        Args:
            lens: (cp, len(seqs), runs) :meth:`lens` of the sequences.
        """
        li = self._layer[layer]
        views = [self._views(li, self.ledger.runs(seq)) for seq in seqs]
        k = tuple(tuple(s[0] for s in segs) for segs in views)
        v = tuple(tuple(s[1] for s in segs) for segs in views)
        if not self.fp8:
            return KVPrefix(k, v, lens)
        ks = tuple(tuple(s[2] for s in segs) for segs in views)
        vs = tuple(tuple(s[3] for s in segs) for segs in views)
        return KVPrefix(k, v, lens, ks, vs, self.dtype)

    def lens(self, seqs: Sequence[int]):
        """(cp, len(seqs), runs) committed tokens of ``seqs`` per CP rank and run: known on
        every rank from the books, with no exchange."""
        return self.pool.lens(seqs)

    # -- managing sequences -----------------------------------------------------------------
    def copy_tail(self, copies) -> None:
        """Copy this rank's tail of a fork (``copies[cp_rank]``: (source slot, destination
        slot, tokens) or None), which :meth:`KVCacheManager.fork
        <cp_infer.engine.kv_manager.KVCacheManager.fork>` planned on the books."""
        assert not self._plan, "fork between passes, not during one"
        copy = copies[self.cp_rank]
        if copy is not None:
            s, d, n = copy
            for t in (self.k, self.v, self.k_scale, self.v_scale):
                if t is not None:
                    t[:, :, d : d + n] = t[:, :, s : s + n]

    def fork(self, src: int, dst: int, position: int) -> None:
        """Start ``dst`` with every token of ``src`` before ``position``: whole blocks shared,
        a partly shared block's tokens copied (on every rank's books; this rank copies its own).

        Raises:
            PoolFull: no block for the copy on some rank (nothing changed).
        """
        self.copy_tail(self.pool.fork(src, dst, position))

    def free(self, seq: int) -> None:
        """Let go of ``seq``'s blocks (on every rank's books)."""
        self.pool.free(seq)
