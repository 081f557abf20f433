"""The KV hand-off between a prefill tier and a decode tier, resharded on the way.

A prompt's K/V leave the prefill tier as its layout holds them: every CP rank the tokens of its
load-balanced chunks (or wherever its cache put them), every TP rank its share of the KV heads.
They arrive in the decode tier's layout: every TP rank its own share of the heads, all of the
sequence's tokens (the decode tier runs ``cp=1`` here). Each (prefill rank, decode rank) pair
whose heads overlap exchanges exactly those heads of exactly the sender's tokens, point to
point over the job's hand-off group (:mod:`parallel_state.tiers`), one message a layer::

    prefill tp=1 cp=2             decode tp=2
    rank (cp 0): tokens 0-1, 6-7  -- heads 0 --> rank 0 (head 0, tokens 0-7)
                                  -- heads 1 --> rank 1 (head 1, tokens 0-7)
    rank (cp 1): tokens 2-5       -- heads 0 --> rank 0
                                  -- heads 1 --> rank 1

A head replicated over several prefill TP ranks leaves from the first of them only, so every
token of every head travels once to each decode rank that holds it. An FP8 cache sends FP8 and
its scales, stored as they arrive. No rank holds more than its layout's share.

First each sender sends the positions of its tokens (one int64 tensor, after its length); then,
layer by layer, K and V stacked. The receiver scatters them by position into one (heads, tokens,
D) buffer a layer and stores it through :meth:`EngineCore.adopt`, which also shares whatever
prefix of the sequence the decode tier's cache holds already (a chat's earlier turns): those
positions are not sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cp_infer.engine.core import EngineCore
from cp_infer.models.config import ModelConfig
from cp_infer.parallel.parallelize import kv_head_range
from parallel_state.tiers import TierGroups

__all__ = [
    "HandoffStats", "KVSender", "StagedKV", "adopt_staged", "head_routes", "receive_kv", "send_kv",
    "stage_kv",
]  # fmt: skip


def _kv_heads(cfg: ModelConfig, tp: int, tp_rank: int) -> range:
    """The global KV heads a TP rank holds, as the model's layout splits them."""
    return range(*kv_head_range(cfg, tp, tp_rank))


def head_routes(cfg: ModelConfig, tp_from: int, tp_to: int) -> dict[tuple[int, int], range]:
    """``{(prefill TP rank, decode TP rank): global KV heads it sends there}``: each head from
    the first prefill TP rank that holds it, to every decode TP rank that holds it."""
    source = {}
    for i in range(tp_from):
        for h in _kv_heads(cfg, tp_from, i):
            source.setdefault(h, i)
    routes = {}
    for j in range(tp_to):
        for h in _kv_heads(cfg, tp_to, j):
            key = (source[h], j)
            prev = routes.get(key)
            routes[key] = range(prev.start if prev else h, h + 1)
    return routes


@dataclass
class HandoffStats:
    """What this rank sent or received: (token, head) pairs over the layers, and bytes."""

    token_heads: int = 0
    nbytes: int = 0


def _wire(t: torch.Tensor) -> torch.Tensor:
    """FP8 travels (and is indexed) as its bytes."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t


def _prefill_world_rank(tiers: TierGroups, tp_rank: int, cp_rank: int) -> int:
    return tiers.prefill.world_rank(tp_rank + tiers.prefill.tp * cp_rank)


def _check_tiers(tiers: TierGroups) -> None:
    if tiers.prefill.pp != 1 or tiers.decode.pp != 1 or tiers.decode.cp != 1:
        raise ValueError(
            f"the hand-off runs pp=1 on both tiers and cp=1 on the decode tier, got --prefill "
            f"{tiers.prefill.describe()} --decode {tiers.decode.describe()}"
        )


class KVSender:
    """This prefill rank's K/V of one sequence on their way to the decode ranks of their heads:
    the positions first (:meth:`start`), then one message a layer (:meth:`layer`), each sent
    without waiting, so the transfer runs while the next layers compute; :meth:`finish` waits
    for all of them."""

    def __init__(self, engine: EngineCore, *, tiers: TierGroups, skip: int = 0) -> None:
        _check_tiers(tiers)
        self.engine, self.tiers, self.skip = engine, tiers, skip
        pg, cfg = engine.pg, engine.cfg
        self.mine = _kv_heads(cfg, pg.tp, pg.tp_rank)
        self.routes = {j: heads for (i, j), heads in
                       head_routes(cfg, pg.tp, tiers.decode.tp).items() if i == pg.tp_rank}  # fmt: skip
        self.stats = HandoffStats()
        self.seq: int | None = None
        self.keep = torch.zeros(0, dtype=torch.bool)
        self.sent_layers = 0
        self._pending: list = []

    def start(self, seq: int, staged: bool = False) -> None:
        """Send where ``seq``'s tokens on this rank go (those of this pass too: ``staged``)."""
        positions = torch.tensor(self.engine.cache.positions(seq, staged), dtype=torch.int64)
        self.seq, self.staged = seq, staged
        self.keep = positions >= self.skip
        positions = positions[self.keep]
        self.count = positions.numel()
        for j in self.routes:
            dst = self.tiers.decode.world_rank(j)
            self._send(torch.tensor([self.count]), dst)
            if self.count:
                self._send(positions, dst)

    def layer(self, layer: int) -> None:
        """Send one layer's K/V of the sequence (its heads each decode rank holds)."""
        self.sent_layers += 1
        if not self.count:
            return
        parts = [_wire(t) for t in self.engine.cache.raw(layer, self.seq, self.staged)]
        for j, heads in self.routes.items():
            dst = self.tiers.decode.world_rank(j)
            local = slice(heads.start - self.mine.start, heads.stop - self.mine.start)
            msgs = [torch.stack([parts[0][local, self.keep], parts[1][local, self.keep]])]
            if len(parts) == 4:  # FP8: the scales travel beside it
                msgs.append(torch.stack([parts[2][local, self.keep], parts[3][local, self.keep]]))
            for m in msgs:
                self._send(m, dst)
                self.stats.nbytes += m.nbytes
            self.stats.token_heads += len(heads) * self.count

    def abort(self) -> None:
        """Keep the receivers in step after a failed prefill: the positions (none, if it never
        started) and zeros for the layers it did not send; the first token then says -1."""
        if self.seq is None:
            self.count = 0
            for j in self.routes:
                self._send(torch.zeros(1, dtype=torch.int64), self.tiers.decode.world_rank(j))
            return
        cache, layers = self.engine.cache, len(self.engine.cache.layer_ids)
        wire = _wire(cache.k).dtype
        for _ in range(self.sent_layers, layers if self.count else 0):
            for j, heads in self.routes.items():
                dst = self.tiers.decode.world_rank(j)
                self._send(torch.zeros(2, len(heads), self.count, cache.head_dim, dtype=wire), dst)
                if cache.fp8:
                    self._send(torch.zeros(2, len(heads), self.count), dst)
        self.sent_layers = layers

    def finish(self) -> HandoffStats:
        for work in self._pending:
            work.wait()
        self._pending = []
        return self.stats

    def _send(self, t: torch.Tensor, dst: int) -> None:
        self._pending.append(self.tiers.handoff.send([t], dst, 0))


def send_kv(
    engine: EngineCore, seq: int, *, tiers: TierGroups, skip: int = 0
) -> HandoffStats:  # fmt: skip
    """Send this prefill rank's K/V of ``seq`` (positions ``skip`` and on) to the decode ranks
    that hold its heads, after its prefill (call on every prefill rank, for the sequences in
    the same order)."""
    sender = KVSender(engine, tiers=tiers, skip=skip)
    sender.start(seq)
    for layer in engine.cache.layer_ids:
        sender.layer(layer)
    return sender.finish()


@dataclass
class StagedKV:
    """One sequence's K/V as a decode rank received them, before its cache takes them: per
    layer (2, heads, tokens, D) K and V of this rank's heads (FP8: as bytes, with (2, heads,
    tokens) scales); positions below ``skip`` were not sent."""

    length: int
    skip: int
    kv: list[torch.Tensor]
    scales: list[torch.Tensor] | None
    stats: HandoffStats


def stage_kv(
    cfg: ModelConfig, *, tp: int, tp_rank: int, layers: int, fp8: bool, dtype: torch.dtype,
    length: int, skip: int, tiers: TierGroups,
) -> StagedKV:  # fmt: skip
    """Receive one sequence's K/V (positions ``skip`` to ``length``) from the prefill tier into
    staging buffers (a decode rank's receiver, in the order the senders send).

    Raises:
        RuntimeError: some position of some head did not arrive exactly once.
    """
    _check_tiers(tiers)
    stats = HandoffStats()
    mine = _kv_heads(cfg, tp, tp_rank)
    sources = [
        (_prefill_world_rank(tiers, i, c), heads)
        for (i, j), heads in head_routes(cfg, tiers.prefill.tp, tp).items() if j == tp_rank
        for c in range(tiers.prefill.cp)
    ]  # fmt: skip
    group = tiers.handoff
    where = []
    for src, _ in sources:
        n = torch.zeros(1, dtype=torch.int64)
        group.recv([n], src, 0).wait()
        pos = torch.empty(int(n), dtype=torch.int64)
        if pos.numel():
            group.recv([pos], src, 0).wait()
        where.append(pos)
    covered = torch.zeros(len(mine), length, dtype=torch.int32)
    for (_, heads), pos in zip(sources, where, strict=True):
        local = slice(heads.start - mine.start, heads.stop - mine.start)
        covered[local, pos] += 1
        stats.token_heads += len(heads) * pos.numel() * layers
    if not bool((covered[:, skip:] == 1).all()) or bool(covered[:, :skip].any()):
        raise RuntimeError(
            f"the hand-off of {length} tokens did not bring positions {skip}-{length - 1} of "
            "every head exactly once"
        )
    wire = torch.uint8 if fp8 else dtype
    kvs, scales = [], [] if fp8 else None
    for _ in range(layers):
        kv = torch.zeros(2, len(mine), length, cfg.head_dim, dtype=wire)
        sc = torch.ones(2, len(mine), length) if fp8 else None
        for (src, heads), pos in zip(sources, where, strict=True):
            if not pos.numel():
                continue
            local = slice(heads.start - mine.start, heads.stop - mine.start)
            got = torch.empty(2, len(heads), pos.numel(), cfg.head_dim, dtype=wire)
            group.recv([got], src, 0).wait()
            kv[:, local, pos] = got
            stats.nbytes += got.nbytes
            if sc is not None:
                s = torch.empty(2, len(heads), pos.numel())
                group.recv([s], src, 0).wait()
                sc[:, local, pos] = s
                stats.nbytes += s.nbytes
        kvs.append(kv)
        if scales is not None:
            scales.append(sc)
    return StagedKV(length, skip, kvs, scales, stats)


def adopt_staged(engine: EngineCore, tokens: list[int], staged: StagedKV) -> int:
    """Store a staged hand-off in ``engine``'s cache as a retained sequence of ``tokens``
    (:meth:`EngineCore.adopt`: what the cache shares of them is not written); returns it."""
    cache = engine.cache

    def fill(seq: int, start: int) -> None:
        if start < staged.skip:
            raise RuntimeError(f"the cache shares {start} tokens of the hand-off, which skipped "
                               f"{staged.skip}: the shared prefix was evicted")  # fmt: skip
        for li, layer in enumerate(cache.layer_ids):
            kv = staged.kv[li].view(cache.k.dtype)
            sc = staged.scales[li] if staged.scales is not None else None
            cache.store(layer, kv[0][:, start:], kv[1][:, start:],
                        (sc[0][:, start:], sc[1][:, start:]) if sc is not None else None)  # fmt: skip

    seq, _ = engine.adopt(tokens, fill)
    return seq


def receive_kv(
    engine: EngineCore, tokens: list[int], *, tiers: TierGroups, skip: int = 0
) -> tuple[int, HandoffStats]:  # fmt: skip
    """:func:`stage_kv` then :func:`adopt_staged` (offline: the receiver is the engine's own
    thread); returns the sequence and what arrived."""
    pg, cache = engine.pg, engine.cache
    staged = stage_kv(
        engine.cfg, tp=pg.tp, tp_rank=pg.tp_rank, layers=len(cache.layer_ids), fp8=cache.fp8,
        dtype=cache.k.dtype, length=len(tokens), skip=skip, tiers=tiers,
    )  # fmt: skip
    return adopt_staged(engine, list(tokens), staged), staged.stats
