"""The KV tier in the engine: spills when the pool evicts, reads when a prompt starts with an
entry (see :mod:`cp_infer.engine.kv_tier` for the tier itself).

Spills. When the leader's books evict a retained sequence (:meth:`KVCacheManager.reclaim
<cp_infer.engine.kv_manager.KVCacheManager.reclaim>`), the index decides whether it goes to the
tier (not already there, within the budget and the write buffer); if so the leader copies its
own share at once (its blocks may be written again before the plan runs) and the plan's
``("spill", seq, key)`` op, ahead of the ``("free", seq)``, has every other rank copy its share
before replaying the free. The writes run in the background.

Reads, for the leader. A waiting request whose prompt starts with a tier entry longer (by
``min_tokens``) than what the pool holds of it is set aside while every rank reads its share
(``("tier_fetch", ...)``, in the background: other requests' steps go on). When rank 0's read
is done, a plan of ``("tier_check", ticket)`` ops has every rank say whether its read
succeeded (one all-reduce); on success the K/V are adopted as a retained sequence, exactly as a
prefill tier's hand-off is (:func:`~cp_infer.engine.remote.adopt`), and the request queues first
to prefill what is left over them; on failure the entry is dropped and the request prefills its
whole prompt. Either way it never asks the tier again.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from cp_infer.distributed import on_all_ranks
from cp_infer.engine.kv_tier import (
    TierEntry,
    TierIndex,
    TierIO,
    owned_heads,
    shard_name,
)  # fmt: skip
from cp_infer.engine.remote import adopt
from cp_infer.engine.request import Done
from cp_infer.engine.sizing import token_bytes

if TYPE_CHECKING:
    from cp_infer.engine.core import EngineCore, _Live

__all__ = ["TierReads", "attach_tier", "detach_tier"]

logger = logging.getLogger(__name__)

DEFAULT_WRITE_BUFFER = 1 << 30


@dataclass
class _Read:
    x: _Live
    pinned: int | None  # the pool's sequence holding the first ``skip`` tokens
    entry: TierEntry
    skip: int
    length: int
    started: float


class TierReads:
    """The leader's side of the tier in the engine (see the module docstring).

    Args:
        engine: the engine core (the leader's).
        io: rank 0's reads and writes.
        index: the tier's entries.
        min_tokens: read an entry only when it holds at least this many tokens more of the
            prompt than the pool does.
    """

    def __init__(self, engine: EngineCore, io: TierIO, index: TierIndex, min_tokens: int) -> None:
        self.engine, self.io, self.index, self.min_tokens = engine, io, index, min_tokens
        self.jobs: dict[int, _Read] = {}
        self._tickets = itertools.count()

    @property
    def stats(self):
        s = self.index.stats
        s.load_s, s.store_s = self.io.read_s, self.io.write_s
        return s

    # -- spills -------------------------------------------------------------------------------
    def evicting(self, seq: int, tokens: Sequence[int]) -> None:
        """The books evict ``seq`` (holding ``tokens``): spill it if the index wants it."""
        pool = self.engine.pool
        entry = self.index.plan_spill(tokens, [g.tokens(seq) for g in pool.ledgers],
                                      self.io.pending_bytes)  # fmt: skip
        if entry is None:
            return
        self.io.capture(seq, entry.key)  # now: the plan may reuse its blocks before it runs
        self.engine.kv.ops.append(("spill", seq, entry.key))

    def spill_all(self) -> int:
        """Evict every retained sequence no job pins, spilling what the index takes (the
        engine is stopping: the pool's contents would be lost). Returns the spills."""
        kv = self.engine.kv
        ops = len(kv.ops)
        for seq in [s for s in kv.retained if not kv.pins[s]]:
            self.evicting(seq, kv.index.tokens[seq])
            kv.release(seq)
        return sum(op[0] == "spill" for op in kv.ops[ops:])

    # -- reads --------------------------------------------------------------------------------
    def wants(self, x: _Live, tokens: list[int], shared: int) -> tuple[TierEntry, int] | None:
        """The entry ``x`` (whose ``tokens`` those are; the pool holds ``shared``) reads, and
        how many tokens of it, or None. A request asks once."""
        if x.tiered or x.prompt_logprobs:  # every prompt token needs its logits: none is read
            return None
        x.tiered = True
        self.index.stats.queries += len(tokens) - shared
        entry, n = self.index.match(tokens)
        n = min(n, len(tokens) - 1)  # (at least one token is computed: the first logits)
        if entry is None or n - shared < self.min_tokens:
            return None
        return entry, n

    def fetch(self, x: _Live, holder: int | None, shared: int, entry: TierEntry, n: int) -> None:
        """Every rank starts reading its share of ``entry``'s first ``n`` tokens past the
        ``shared`` ones the pool holds (``holder``'s, pinned meanwhile), or all ``n`` when
        pinning ``holder`` would not leave the pool room for the rest (a chat template's
        header, shared with another chat, is no reason to keep that chat)."""
        kv = self.engine.kv
        pinned = None
        if holder is not None and self.engine._worth_pinning(
            holder, shared, kv.blocks_for_tokens(n - shared)
        ):
            pinned = holder
        if pinned is not None:
            kv.pin(pinned)
        skip = shared if pinned is not None else 0
        self.index.pin(entry)
        ticket = next(self._tickets)
        self.engine.kv.ops.append(("tier_fetch", ticket, entry.key, entry.shards, skip, n))
        self.jobs[ticket] = _Read(x, pinned, entry, skip, n, time.perf_counter())

    def ready(self) -> bool:
        return any(self.io.done(t) for t in self.jobs)

    def cancel(self, rids: set[int] | frozenset[int]) -> None:
        """Requests whose client left: each ends once its read is back (the K/V are kept)."""
        for job in self.jobs.values():
            if job.x.request.rid in rids:
                job.x.outcome.finish_reason = "cancelled"

    def land(self, done: Done | None) -> None:
        """The reads rank 0 finished: every rank agrees on each, and each is adopted (or
        dropped), its request queued first (or ended, if cancelled)."""
        engine, kv = self.engine, self.engine.kv
        ready = [t for t in self.jobs if self.io.done(t)]
        if not ready:
            return
        kv.ops.extend(("tier_check", t) for t in ready)
        engine.flush()  # every rank says whether it read its share
        for t in ready:
            job = self.jobs.pop(t)
            why = engine.worker.tier_agreed.pop(t)  # (None: every rank read its share)
            staged, _ = self.io.take(t)
            seq = None
            if why is None:
                tokens = job.x.tokens[: job.length]
                try:
                    seq = adopt(engine, tokens, lambda _seq, s=staged: s.store(engine.cache),
                                skip=job.skip)  # fmt: skip
                except Exception as e:  # the pool is full, say: prefill it instead
                    logger.info("request %d: tier entry not adopted (%s): prefilled instead",
                                job.x.request.rid, e)  # fmt: skip
            if job.pinned is not None:
                kv.unpin(job.pinned)
            self.index.unpin(job.entry)
            if seq is not None:
                kv.ops.append(("tier_adopt", t, seq, job.skip, job.length))
                self.index.touch(job.entry)
                s = self.index.stats
                s.hits += job.length - job.skip
                s.load_bytes += self.index.entry_bytes(job.length - job.skip)
                logger.debug("request %d: %d tokens read back from the KV tier in %.3fs",
                             job.x.request.rid, job.length - job.skip,
                             time.perf_counter() - job.started)  # fmt: skip
            else:
                kv.ops.append(("tier_drop", t))
                if why is not None:
                    self.index.drop(job.entry, why)
            x = job.x
            if x.outcome.finish_reason == "cancelled":
                x.outcome.tokens = list(x.before)
                engine._finish([x], done)
            else:
                engine.waiting.appendleft(x)


def attach_tier(
    engine: EngineCore, path: Path, *, fingerprint: str, budget: int,
    write_buffer: int = DEFAULT_WRITE_BUFFER, min_tokens: int | None = None, group=None,
) -> None:  # fmt: skip
    """Give ``engine`` a KV tier in ``path`` (every rank of the engine calls it: a collective).

    The tier lives in ``path/<fingerprint[:16]>``; the leader takes it (a lock: one server a
    directory) and indexes what is there, every rank checks that it sees the same directory.

    Args:
        fingerprint: the model's (:func:`~cp_infer.engine.kv_tier.model_fingerprint`).
        budget: bytes the tier may hold.
        write_buffer: bytes of spilled K/V rank 0 may hold before they are written.
        min_tokens: read an entry only when it holds this many more tokens of a prompt than
            the pool (default: a block).
        group: the engine's process group (default: the engine's channel's).

    Raises:
        RuntimeError: on every rank, when the leader cannot take the directory or some rank
            does not see it.
    """
    group = group if group is not None else engine.channel.group
    pg, cache, cfg = engine.pg, engine.cache, engine.cfg
    root = Path(path) / fingerprint[:16]
    index = None
    error = None
    if engine.leader:
        per_token = _token_bytes(engine)
        index = TierIndex(
            root, fingerprint=fingerprint, budget=budget, write_buffer=write_buffer,
            entry_bytes=lambda n: n * per_token,
            shards=lambda rank_tokens: _shards(engine, rank_tokens),
        )  # fmt: skip
        try:
            index.open()
        except (OSError, RuntimeError) as e:
            error = (str(e) if isinstance(e, RuntimeError) else
                     f"--kv-tier {path}: {e.strerror or e}: give a directory this user can "
                     "create and write")  # fmt: skip
    _agree(root, group, engine.leader, error)
    io = TierIO(root, fingerprint=fingerprint, cfg=cfg, cache=cache, tp=pg.tp,
                tp_rank=pg.tp_rank, cp=pg.cp, cp_rank=pg.cp_rank, pp_rank=pg.pp_rank)  # fmt: skip
    engine.worker.tier, engine.worker.group = io, group
    if engine.leader:
        reads = TierReads(engine, io, index, min_tokens or engine.pool.block_size)
        engine.tiering = reads
        engine.kv.evicting = reads.evicting
        logger.info("KV tier %s: %d entries, budget %.1f GiB", root, len(index.entries),
                    budget / 2**30)  # fmt: skip


def _token_bytes(engine: EngineCore) -> int:
    """Bytes of one token in an entry: its K/V of every layer and KV head (FP8 with scales)
    and its position in every shard (a shard per TP writer and stage)."""
    cfg, cache, pg = engine.cfg, engine.cache, engine.pg
    writers = sum(bool(len(owned_heads(cfg, pg.tp, t))) for t in range(pg.tp)) * pg.pp
    kv = token_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cache.dtype.itemsize,
                     cache.kv_dtype)  # fmt: skip
    return kv + 8 * writers


def _shards(engine: EngineCore, rank_tokens: Sequence[int]) -> list[str]:
    """The shard files of an entry whose tokens lie ``rank_tokens[r]`` on CP rank r."""
    pg, cfg = engine.pg, engine.cfg
    return [shard_name(t, c, p) for p in range(pg.pp) for c in range(pg.cp) for t in range(pg.tp)
            if rank_tokens[c] and len(owned_heads(cfg, pg.tp, t))]  # fmt: skip


def _agree(root: Path, group, leader: bool, error: str | None) -> None:
    """Every rank learns whether the leader took the tier, and checks it sees the directory
    (the leader leaves a file there). Raises on every rank otherwise."""

    def took() -> str:
        if error is not None:
            raise RuntimeError(error)
        if not leader:
            return ""
        probe = f".probe-{secrets.token_hex(8)}"
        (root / probe).write_text("")
        return probe

    probe = on_all_ranks(took, group)
    if dist.is_available() and dist.is_initialized():
        box = [probe]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0,
                                   group=group)  # fmt: skip
        probe = box[0]

    def sees() -> None:
        if not (root / probe).exists():
            raise RuntimeError(
                f"the KV tier {root.parent} is not one directory every rank of the engine sees "
                "(ranks on another host): give --kv-tier a shared file system's path"
            )

    try:
        on_all_ranks(sees, group)
    finally:
        if leader:
            (root / probe).unlink(missing_ok=True)


def detach_tier(engine: EngineCore) -> None:
    """Wait for this rank's spills to be written and let the tier go (every rank; the leader
    releases the directory for the next server)."""
    io = engine.worker.tier
    if io is None:
        return
    io.close()
    if engine.tiering is not None:
        engine.tiering.index.close()
        engine.kv.evicting = None
        engine.tiering = None
    engine.worker.tier = None
