"""Prompts prefilled by another engine (disaggregated serving), on the engine that decodes them.

With a :class:`~cp_infer.engine.connector.KVConnector` attached
(:meth:`EngineCore.connect <cp_infer.engine.core.EngineCore.connect>`), a waiting request whose
new tokens number at least the connector's ``min_tokens`` is not prefilled here: it is sent
out as a :class:`~cp_infer.engine.connector.PrefillJob` (the cached prefix it skips pinned
meanwhile), and once its K/V and first token are back, its K/V are adopted into the cache as a
retained sequence (:func:`adopt`) and it queues to decode first, starting from that sequence.
Every rank runs this alike; only the connector knows the transport.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cp_infer.distributed import error_message
from cp_infer.engine.connector import KVConnector, PrefillJob
from cp_infer.engine.kv_cache import KVCache, StorePlan
from cp_infer.engine.kv_pool import PoolFull
from cp_infer.engine.request import Done
from cp_infer.engine.sampling import GREEDY_BELOW
from cp_infer.sharding import span_positions

if TYPE_CHECKING:
    from cp_infer.engine.core import EngineCore, _Live

__all__ = ["RemotePrefills", "adopt", "handoff_plans", "store_handoff"]


class RemotePrefills:
    """The requests away at the connector's engine, and what to do when each is back.

    Args:
        engine: the engine core that decodes them.
        connector: how their prompts go out and their K/V come back.
    """

    def __init__(self, engine: EngineCore, connector: KVConnector) -> None:
        self.engine, self.connector = engine, connector
        self.jobs: dict[int, tuple[_Live, int | None]] = {}  # rid -> (it, pinned seq)

    def wants(self, x: _Live, tokens: list[int], shared: int) -> bool:
        """Whether ``x`` prefills elsewhere: a long prompt the other engine's pool can hold,
        not one recomputed after a preemption (a resumed one is: its tokens so far with it),
        and not one whose prompt's log-probabilities this engine must compute."""
        c = self.connector
        return (x.first_run and not x.request.wants_logprobs
                and len(tokens) - shared >= c.min_tokens and c.fits(len(tokens)))  # fmt: skip

    def send(self, x: _Live, tokens: list[int], holder: int | None, shared: int) -> None:
        """Hand ``x`` out (every rank alike; the connector's leading rank sends the job); the
        cached prefix it skips stays pinned until it is back."""
        kv = self.engine.kv
        pinned = holder if holder is not None and shared else None
        if pinned is not None:
            kv.pin(pinned)
        job = PrefillJob(x.request.rid, tuple(tokens), x.request.sampling,
                         skip=shared if pinned is not None else 0,
                         generated=len(x.before))  # fmt: skip
        self.connector.submit(job)
        kv.ops.append(("remote", job))  # every follower expects its share of the K/V
        self.jobs[x.request.rid] = (x, pinned)
        x.outcome.cached_tokens = min(job.skip, len(x.request.tokens))  # what it held of it
        kv.stats.remote_prefills += 1

    def cancel(self, rids: set[int] | frozenset[int]) -> None:
        """Requests whose client left: each ends when it is back."""
        for rid in rids & set(self.jobs):
            self.jobs[rid][0].outcome.finish_reason = "cancelled"

    def adopt_arrived(self, rids: Sequence[int], emit, done: Done | None) -> None:
        """Requests back: their K/V into the cache (a retained sequence), their first token
        out, and they queue to decode first."""
        engine = self.engine
        for rid in rids:
            x, pinned = self.jobs.pop(rid)
            first, staged, error = self.connector.take(rid)
            seq = None
            try:
                if error is None:
                    seq = adopt(
                        engine,
                        x.tokens,
                        lambda _seq, s=staged: s.store(engine.cache),
                        skip=staged.skip,
                    )
            except Exception as e:  # the pool is full, say: this request alone fails
                error = error_message(e)
            finally:
                if pinned is not None:
                    engine.kv.unpin(pinned)
            if seq is not None:  # the followers store their shares of it as this sequence
                engine.kv.ops.append(("adopt", rid, seq, staged.skip, len(x.tokens)))
            else:
                engine.kv.ops.append(("drop", rid))
            o = x.outcome
            if error is not None or o.finish_reason == "cancelled":
                if error is not None:
                    o.finish_reason, o.error = "error", error
                engine._finish([x], done)
                continue
            x.before = [*x.before, first]  # (a resumed request's tokens so far, then it)
            if x.request.sampling.temperature >= GREEDY_BELOW:  # the other engine drew one
                engine.kv.ops.append(("draw", rid, 1))
            o.ttft_s = time.perf_counter() - x.admitted
            if emit is not None:
                emit([(rid, first, None)])
            sampling = x.request.sampling
            if first in sampling.eos_ids or len(x.before) >= sampling.max_new_tokens:
                o.tokens = list(x.before)
                o.finish_reason = "stop" if first in sampling.eos_ids else "length"
                engine._finish([x], done)
                continue
            engine.waiting.appendleft(x)


def adopt(
engine: EngineCore, tokens: Sequence[int], fill: Callable[[int], None], *, skip: int = 0
) -> int:  # fmt: skip
    """Cache ``tokens`` in ``engine``, whose K/V another engine computed (a prefill tier's hand-off), as a
    retained sequence a request for them (and more) then starts from. Its first ``skip``
    tokens are this cache's already (a chat's earlier turns): shared, not received.

    Every CP rank keeps the positions of ``[skip, len(tokens))`` a prefill of them here
    would have left it (:func:`~cp_infer.sharding.span_positions`); every pipeline stage
    keeps its own layers.

    Args:
        tokens: the sequence's tokens.
        skip: how many leading tokens the cache shares (some cached sequence must hold
            them).
        fill: ``fill(seq)``, called with the pool's room planned for this rank's positions
            of the new sequence: it stores them, every layer (:meth:`KVCache.store`).

    Returns:
        The new sequence.

    Raises:
        PoolFull: the pool cannot hold them even with every retained sequence evicted.
        RuntimeError: the cache no longer holds the ``skip`` tokens.
    """
    tokens = list(tokens)
    holder, shared = engine.kv.match(tokens) if skip else (None, 0)
    if shared < skip:  # (no holder: shared is 0)
        raise RuntimeError(f"the cache shares {shared} tokens of the hand-off, which skipped "
                           f"{skip}: the shared prefix was evicted")  # fmt: skip
    full = PoolFull(f"the KV pool cannot hold a hand-off of {len(tokens)} tokens: raise "
                    "--kv-cache-memory on the decode tier")  # fmt: skip
    seq = engine.kv.new_seq()
    try:
        if skip:  # a partly shared block's tokens are copied into a block of its own
            try:
                engine.cache.copy_tail(engine.kv.fork(holder, seq, skip))
            except PoolFull:
                raise full from None
        plans = handoff_plans(seq, skip, len(tokens), engine.pool.cp)
        needs = [g.blocks_for(seq, len(p[0].positions))
                 for g, p in zip(engine.pool.ledgers, plans, strict=True)]  # fmt: skip
        if not engine.kv.reclaim(needs):
            raise full
        store_handoff(engine.cache, plans, lambda: fill(seq))
    except BaseException:
        engine.kv.release(seq)
        raise
    engine.kv.retain(seq, tokens)  # (the request that starts from it counts the lookup)
    return seq


def handoff_plans(seq: int, skip: int, length: int, cp: int) -> list[list[StorePlan]]:
    """Each CP rank's :class:`StorePlan` for a hand-off's positions ``[skip, length)`` of
    ``seq``: what a prefill of them here would have left that rank."""
    return [[StorePlan(seq, 0, tuple(span_positions(skip, length, cp, r)))] for r in range(cp)]


def store_handoff(cache: KVCache, plans: list[list[StorePlan]], fill: Callable[[], None]) -> None:
    """Plan ``plans`` on the books, ``fill()`` stores this rank's K/V (every layer), commit;
    the books as they were if ``fill`` fails (the leader's adoption, a follower's replay)."""
    cache.plan(plans)
    try:
        fill()
    except BaseException:
        cache.abort()
        raise
    cache.commit()
