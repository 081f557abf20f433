"""The KV hand-off between a prefill tier and a decode tier, resharded on the way.

A prompt's K/V leave the prefill tier as its layout holds them: every CP rank the tokens of its
load-balanced chunks (or wherever its cache put them), every TP rank its share of the KV heads,
every pipeline stage its layers. They arrive in the decode tier's layout: every TP rank its own
share of the heads, every pipeline stage its layers, every CP rank the positions a prefill on
that tier would have left it (:func:`~cp_infer.sharding.span_positions`; with ``cp=1``, all).
Each (prefill rank, decode rank) pair whose heads and layers overlap is a :class:`Route`: the
sender sends exactly those heads and layers of exactly its tokens the receiver keeps, point to
point over the job's hand-off group (:mod:`parallel_state.tiers`), one message a layer::

    prefill tp=1 cp=2             decode tp=2
    rank (cp 0): tokens 0-1, 6-7  -- heads 0 --> rank 0 (head 0, tokens 0-7)
                                  -- heads 1 --> rank 1 (head 1, tokens 0-7)
    rank (cp 1): tokens 2-5       -- heads 0 --> rank 0
                                  -- heads 1 --> rank 1

A head replicated over several prefill TP ranks leaves from the first of them only, so every
token of every head of every layer travels once to each decode rank that keeps it. An FP8 cache
sends FP8 and its scales, stored as they arrive. No rank holds more than its layout's share.

On every route, first the sender's count of tokens and their positions, then, layer by layer
as its stage computes them, K and V stacked. The receiver scatters them by position into one
(heads, tokens it keeps, D) buffer a layer and stores them through :meth:`EngineCore.adopt`,
which shares the prefix of the sequence the decode tier's cache holds already (a chat's earlier
turns, ``skip`` tokens): those positions are not sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING

import torch

from cp_infer.engine.kv_cache import KVCache
from cp_infer.models.config import ModelConfig
from cp_infer.parallel.parallelize import kv_head_range
from cp_infer.parallel.pipeline import stage_layers
from cp_infer.sharding import span_positions
from parallel_state.tiers import TierGroups

if TYPE_CHECKING:
    from cp_infer.engine.core import EngineCore

__all__ = [
    "HandoffStats", "KVSender", "Route", "StagedKV", "head_routes", "routes",
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


@dataclass(frozen=True)
class Route:
    """What one prefill rank sends one decode rank: these global KV heads of these layers, of
    the positions the decode rank's CP rank keeps."""

    src: int  # world ranks
    dst: int
    heads: range
    layers: range
    cp_rank: int  # the receiver's, in the decode tier


def routes(cfg: ModelConfig, tiers: TierGroups) -> list[Route]:
    """Every route of the hand-off, in one order on every rank (each pair at most once)."""
    pre, dec = tiers.prefill, tiers.decode
    heads = head_routes(cfg, pre.tp, dec.tp)
    out = []
    for s, c, i, s2, c2, j in product(range(pre.pp), range(pre.cp), range(pre.tp),
                                      range(dec.pp), range(dec.cp), range(dec.tp)):  # fmt: skip
        mine = stage_layers(cfg.n_layers, pre.pp, s)
        theirs = stage_layers(cfg.n_layers, dec.pp, s2)
        layers = range(max(mine.start, theirs.start), min(mine.stop, theirs.stop))
        if layers and (i, j) in heads:
            out.append(Route(pre.rank_of(i, c, s), dec.rank_of(j, c2, s2), heads[(i, j)],
                             layers, c2))  # fmt: skip
    return out


@dataclass
class HandoffStats:
    """What this rank sent or received: (token, head, layer) triples, and bytes."""

    token_heads: int = 0
    nbytes: int = 0


def _wire(t: torch.Tensor) -> torch.Tensor:
    """FP8 travels (and is indexed) as its bytes."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t


def _check_rank(engine: EngineCore, tiers: TierGroups) -> None:
    pg = engine.pg
    if tiers.tier.rank_of(pg.tp_rank, pg.cp_rank, pg.pp_rank) != tiers.rank:
        raise RuntimeError(
            f"world rank {tiers.rank} is tp {pg.tp_rank}, cp {pg.cp_rank}, pp {pg.pp_rank} of "
            f"{tiers.tier.describe()}, not where the hand-off's routes put it"
        )


class KVSender:
    """This prefill rank's K/V of one sequence on their way to the decode ranks that keep them:
    the positions first (:meth:`start`), then one message a layer and route (:meth:`layer`),
    each sent without waiting, so the transfer runs while the next layers compute;
    :meth:`finish` waits for all of them."""

    def __init__(self, engine: EngineCore, *, tiers: TierGroups, length: int,
                 skip: int = 0) -> None:  # fmt: skip
        _check_rank(engine, tiers)
        self.engine, self.tiers, self.length, self.skip = engine, tiers, length, skip
        self.mine = _kv_heads(engine.cfg, engine.pg.tp, engine.pg.tp_rank)
        self.routes = [r for r in routes(engine.cfg, tiers) if r.src == tiers.rank]
        self.stats = HandoffStats()
        self.seq: int | None = None
        # per route: which of this rank's tokens go there (on the cache's device), how many
        self.keep: list[tuple[torch.Tensor, int]] = []
        self.sent_layers = 0
        self._pending: list = []

    def start(self, seq: int, staged: bool = False) -> None:
        """Send where ``seq``'s tokens on this rank go (those of this pass too: ``staged``)."""
        positions = torch.tensor(self.engine.cache.positions(seq, staged), dtype=torch.int64)
        self.seq, self.staged = seq, staged
        dec, masks = self.tiers.decode, {}
        for route in self.routes:  # routes to one decode CP rank share its positions
            if route.cp_rank not in masks:
                kept = span_positions(self.skip, self.length, dec.cp, route.cp_rank)
                masks[route.cp_rank] = torch.isin(positions, torch.tensor(kept, dtype=torch.int64))
            mask = masks[route.cp_rank]
            self._send_positions(route, positions[mask])
            self.keep.append((mask.to(self.engine.cache.k.device), int(mask.sum())))

    def layer(self, layer: int) -> None:
        """Send one layer's K/V of the sequence (the heads each route's receiver keeps)."""
        self.sent_layers += 1
        parts = None
        for route, (keep, n) in zip(self.routes, self.keep, strict=True):
            if layer not in route.layers or not n:
                continue
            if parts is None:
                parts = [_wire(t) for t in self.engine.cache.raw(layer, self.seq, self.staged)]
            local = slice(route.heads.start - self.mine.start, route.heads.stop - self.mine.start)
            msgs = [torch.stack([parts[0][local, keep], parts[1][local, keep]])]
            if len(parts) == 4:  # FP8: the scales travel beside it
                msgs.append(torch.stack([parts[2][local, keep], parts[3][local, keep]]))
            for m in (m.cpu() for m in msgs):  # (gloo: through host memory on a GPU)
                self._send(m, route.dst)
                self.stats.nbytes += m.nbytes
            self.stats.token_heads += len(route.heads) * n

    def abort(self) -> None:
        """Keep the receivers in step after a failed prefill: the positions (none, if it never
        started) and zeros for the layers it did not send; the first token then says -1."""
        if self.seq is None:
            for route in self.routes:
                self._send_positions(route, torch.zeros(0, dtype=torch.int64))
            return
        cache = self.engine.cache
        wire = _wire(cache.k).dtype
        for layer in cache.layer_ids[self.sent_layers :]:
            for route, (_, n) in zip(self.routes, self.keep, strict=True):
                if layer not in route.layers or not n:
                    continue
                self._send(torch.zeros(2, len(route.heads), n, cache.head_dim, dtype=wire),
                           route.dst)  # fmt: skip
                if cache.fp8:
                    self._send(torch.zeros(2, len(route.heads), n), route.dst)
        self.sent_layers = len(cache.layer_ids)

    def finish(self) -> HandoffStats:
        for work in self._pending:
            work.wait()
        self._pending = []
        return self.stats

    def _send_positions(self, route: Route, positions: torch.Tensor) -> None:
        self._send(torch.tensor([positions.numel()]), route.dst)
        if positions.numel():
            self._send(positions, route.dst)

    def _send(self, t: torch.Tensor, dst: int) -> None:
        self._pending.append(self.tiers.handoff.send([t], dst, 0))


@dataclass
class StagedKV:
    """One sequence's K/V as a decode rank received them, before its cache takes them: per
    layer of its stage (2, heads, tokens, D) K and V of its heads and of the positions its CP
    rank keeps (FP8: as bytes, with (2, heads, tokens) scales); positions below ``skip`` were
    not sent."""

    length: int
    skip: int
    kv: list[torch.Tensor]
    scales: list[torch.Tensor] | None
    stats: HandoffStats

    def store(self, cache: KVCache) -> None:
        """Store every layer into ``cache``, whose room for this rank's positions is planned
        (the ``fill`` of :meth:`EngineCore.adopt`)."""
        for li, layer in enumerate(cache.layer_ids):
            kv = self.kv[li].to(cache.k.device).view(cache.k.dtype)
            sc = self.scales[li].to(cache.k.device) if self.scales is not None else None
            cache.store(layer, kv[0], kv[1], (sc[0], sc[1]) if sc is not None else None)


def stage_kv(engine: EngineCore, *, length: int, skip: int, tiers: TierGroups) -> StagedKV:
    """Receive one sequence's K/V (positions ``skip`` to ``length``) from the prefill tier into
    staging buffers (a decode rank's receiver, in the order the senders send; reads only the
    engine's layout, so it may run beside the engine's own thread).

    Raises:
        RuntimeError: some position of some head of some layer did not arrive exactly once
            (what did arrive is read all the same: the next sequence's messages stay in step).
    """
    _check_rank(engine, tiers)
    cfg, pg, cache = engine.cfg, engine.pg, engine.cache
    stats = HandoffStats()
    mine = _kv_heads(cfg, pg.tp, pg.tp_rank)
    layers = list(cache.layer_ids)
    kept = torch.tensor(span_positions(skip, length, pg.cp, pg.cp_rank), dtype=torch.int64)
    sources = [r for r in routes(cfg, tiers) if r.dst == tiers.rank]
    group = tiers.handoff
    where = []  # per source: the index in ``kept`` of each position it sends
    for route in sources:
        n = torch.zeros(1, dtype=torch.int64)
        group.recv([n], route.src, 0).wait()
        pos = torch.empty(int(n), dtype=torch.int64)
        if pos.numel():
            group.recv([pos], route.src, 0).wait()
        idx = torch.searchsorted(kept, pos)
        if pos.numel() and (int(idx.max()) >= kept.numel() or not torch.equal(kept[idx], pos)):
            idx = torch.full_like(pos, -1)  # positions this rank does not keep: counted below
        where.append(idx)
    covered = torch.zeros(len(layers), len(mine), kept.numel(), dtype=torch.int32)
    for route, idx in zip(sources, where, strict=True):
        rows = [li for li, layer in enumerate(layers) if layer in route.layers]
        local = slice(route.heads.start - mine.start, route.heads.stop - mine.start)
        if idx.numel() and int(idx.min()) >= 0:
            ones = torch.ones(len(route.heads), idx.numel(), dtype=torch.int32)
            for li in rows:  # a view: counts repeats too
                covered[li, local].index_add_(1, idx, ones)
        stats.token_heads += len(route.heads) * idx.numel() * len(rows)
    whole = bool((covered == 1).all()) and all(int(i.min()) >= 0 for i in where if i.numel())
    wire = torch.uint8 if cache.fp8 else cache.k.dtype
    kvs, scales = [], [] if cache.fp8 else None
    for layer in layers:
        kv = torch.zeros(2, len(mine), kept.numel(), cfg.head_dim, dtype=wire)
        sc = torch.ones(2, len(mine), kept.numel()) if cache.fp8 else None
        for route, idx in zip(sources, where, strict=True):
            if layer not in route.layers or not idx.numel():
                continue
            local = slice(route.heads.start - mine.start, route.heads.stop - mine.start)
            got = torch.empty(2, len(route.heads), idx.numel(), cfg.head_dim, dtype=wire)
            group.recv([got], route.src, 0).wait()
            stats.nbytes += got.nbytes
            if whole:
                kv[:, local, idx] = got
            if sc is not None:
                s = torch.empty(2, len(route.heads), idx.numel())
                group.recv([s], route.src, 0).wait()
                stats.nbytes += s.nbytes
                if whole:
                    sc[:, local, idx] = s
        kvs.append(kv)
        if scales is not None:
            scales.append(sc)
    if not whole:
        raise RuntimeError(
            f"the hand-off of {length} tokens did not bring positions {skip}-{length - 1} of "
            "every head and layer this rank keeps exactly once"
        )
    return StagedKV(length, skip, kvs, scales, stats)
