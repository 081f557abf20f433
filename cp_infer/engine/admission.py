"""Admission, for the leader: requests in, requests out, and room in the KV pool.

The leader's door (:meth:`Admission.submit`, :meth:`~Admission.cancel`,
:meth:`~Admission.arrived`) queues requests; before each iteration the waiting ones start while
slots and memory last (first come, first served, each from the longest cached prefix), the
latest one is preempted when a step's tokens do not fit, and finished ones retire, their
sequences retained for reuse. A mixin of :class:`~cp_infer.engine.core.EngineCore` (its books,
scheduler and queue).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cp_infer.distributed import error_message
from cp_infer.engine.kv_manager import common_prefix
from cp_infer.engine.params import GREEDY_BELOW
from cp_infer.engine.request import Done, Emit, Outcome, Request, check_pool
from cp_infer.engine.scheduler import SequenceState

__all__ = ["Admission"]

logger = logging.getLogger(__name__)


@dataclass
class _Live:
    """A request in flight: waiting for admission, or running (``state`` set)."""

    request: Request
    outcome: Outcome
    state: SequenceState | None = None
    admitted: float = 0.0  # perf_counter when it arrived
    before: list[int] = field(default_factory=list)  # generated before it was preempted
    waited: bool = False  # it waited for room in the pool
    tiered: bool = False  # it looked in the KV tier (once)

    @property
    def tokens(self) -> list[int]:
        """What its sequence must hold before the next token: the prompt, and what was
        generated before a preemption (recomputed)."""
        return [*self.request.tokens, *self.before]

    @property
    def prompt_logprobs(self) -> bool:
        """Its prefill returns the prompt's log-probabilities (once: not when recomputed after a
        preemption; a resumed request's cover the tokens it had generated too)."""
        return self.request.logprobs and self.first_run

    @property
    def first_run(self) -> bool:
        """Not preempted since it arrived (a resumed request arrives with ``before`` set)."""
        return len(self.before) == len(self.request.generated)

    @property
    def generated(self) -> int:
        return len(self.before) + (len(self.state.out) if self.state is not None else 0)


class Admission:
    """The leader's admission, retirement and preemption (a mixin of ``EngineCore``)."""

    # -- the door --------------------------------------------------------------------
    def submit(self, requests: Sequence[Request], done: Done | None = None) -> None:
        """The leader: queue ``requests`` (one the pool cannot hold even alone is refused at
        once, through ``done``)."""
        for req in requests:
            self._arrive(req, done)

    def cancel(self, rids: set[int] | frozenset[int], done: Done | None = None) -> None:
        """The leader: stop the requests whose client left (one away at the prefill tier ends
        when it is back)."""
        if self.remote is not None:
            self.remote.cancel(rids)
        if self.tiering is not None:
            self.tiering.cancel(rids)
        for x in self.live.values():
            if x.request.rid in rids and not x.state.done:
                x.state.done = True
                x.outcome.finish_reason = "cancelled"
        gone = [x for x in self.waiting if x.request.rid in rids]
        for x in gone:
            self.waiting.remove(x)
            x.outcome.finish_reason, x.outcome.tokens = "cancelled", list(x.before)
        self._finish(gone, done)

    def arrived(self, rids: Sequence[int], emit: Emit | None, done: Done | None) -> None:
        """The leader: adopt what the prefill tier sent back for ``rids``."""
        if self.remote is not None and rids:
            self.remote.adopt_arrived(rids, emit, done)

    # -- admission ----------------------------------------------------------------------------
    def _arrive(self, req: Request, done: Done | None) -> None:
        """A request joins the queue, or is refused now if the pool cannot hold it even alone
        (a refusal ends this request alone)."""
        outcome = Outcome(
            prompt_tokens=len(req.tokens), logprobs=[] if req.wants_logprobs else None,
            top_logprobs=[] if req.top_logprobs is not None else None,
        )  # fmt: skip
        try:
            check_pool(len(req.tokens), req.sampling.max_new_tokens, n_blocks=self.pool.n_blocks,
                       block_size=self.pool.block_size, cp=self.pool.cp)  # fmt: skip
        except Exception as e:
            self._refuse(req, outcome, e, done, announced=False)
            return
        self._announce.append((req.rid, req.sampling))  # the workers seed its generator
        if req.generated and req.sampling.temperature >= GREEDY_BELOW:  # resumed: one draw per
            self.kv.ops.append(("draw", req.rid, len(req.generated)))  # token it delivered
        self.waiting.append(_Live(req, outcome, admitted=time.perf_counter(),
                                  before=list(req.generated)))  # fmt: skip

    def _refuse(
        self, req: Request, outcome: Outcome, e: BaseException, done, *, announced: bool = True
    ) -> None:  # fmt: skip
        outcome.finish_reason, outcome.error = "error", error_message(e)
        logger.warning("request %d refused: %s", req.rid, outcome.error)
        if announced:
            self.kv.ops.append(("forget", req.rid))
        if done is not None:
            done([req], {req.rid: outcome})

    def _finish(self, xs: Sequence[_Live], done: Done | None) -> None:
        """``xs`` are over: the workers drop their generators; ``done`` gets the outcomes."""
        for x in xs:
            self.kv.ops.append(("forget", x.request.rid))
        if done is not None and xs:
            done([x.request for x in xs], {x.request.rid: x.outcome for x in xs})

    def _admit_waiting(self, done: Done | None) -> None:
        """Start waiting requests while slots and memory last, first come first served (one
        whose prompt starts like one being prefilled waits for that prefill, and is passed)."""
        i = 0
        while i < len(self.waiting) and len(self.sched.seqs) < self.max_batch:
            x = self.waiting[i]
            tokens = x.tokens
            holder, shared = self._match(x, tokens)
            if self._joins_a_prefill(tokens, shared):
                i += 1
                continue
            found = self.tiering.wants(x, tokens, shared) if self.tiering is not None else None
            if found is not None:  # its prefix is in the KV tier: read back meanwhile
                del self.waiting[i]
                self.tiering.fetch(x, holder, shared, *found)
                continue
            if self.remote is not None and self.remote.wants(x, tokens, shared):
                del self.waiting[i]
                self.remote.send(x, tokens, holder, shared)
                continue
            if not self._start(x, tokens, holder, shared, done):
                if not x.waited:
                    x.waited = True
                    self.stats.waits += 1
                return
            del self.waiting[i]

    def _match(self, x: _Live, tokens: list[int]) -> tuple[int | None, int]:
        """The cached sequence ``x`` (whose ``tokens`` those are) starts from, and how many are
        shared (at least one token is left to compute: it yields the first logits)."""
        if x.prompt_logprobs:  # every prompt token needs its logits
            return None, 0
        holder, shared = self.kv.match(tokens)
        return holder, min(shared, len(tokens) - 1)

    def _joins_a_prefill(self, tokens: list[int], shared: int) -> bool:
        """Whether a running request is prefilling a longer prefix of ``tokens`` (by a block at
        least) than the cache holds: starting after it shares that prefill."""
        if not self.kv.share_prefixes:
            return False
        for s in self.sched.seqs:
            if s.prefilled < len(s.new):
                theirs = s.history + s.prompt
                if common_prefix(theirs, tokens, len(theirs)) >= shared + self.pool.block_size:
                    return True
        return False

    def _promised(self) -> int:
        """Blocks the running requests' prefills still take (on the fullest rank, roughly)."""
        return sum(self.kv.blocks_for_tokens(len(s.new) - s.prefilled)
                   for s in self.sched.seqs if s.prefilled < len(s.new))  # fmt: skip

    def _start(
        self, x: _Live, tokens: list[int], holder: int | None, shared: int, done: Done | None
    ) -> bool:
        """Admit ``x`` (its ``tokens``) if the pool can hold its prompt; False: it waits."""
        rank, moving, keep = self._place(x, tokens, holder, shared)
        if moving is not None and not self._can_move(holder, shared, len(tokens)):
            logger.info("request %d: its %d cached tokens on rank %d are prefilled again on the "
                        "ring (moving them would not leave the pool room)", x.request.rid,
                        shared, moving)  # fmt: skip
            self.stats.prefix_forgone += shared
            holder, shared, moving = None, 0, None
        elif not keep:  # its prefix's rank is too busy: prefill it again on another
            logger.info("request %d: %d cached tokens on a busy rank prefilled again on rank %d",
                        x.request.rid, shared, rank)  # fmt: skip
            self.stats.prefix_forgone += shared
            holder, shared = None, 0
        need = self.kv.blocks_for_tokens(len(tokens) - shared)
        if need + self._promised() > self.kv.available():
            if self.sched.seqs:
                return False  # the running requests free blocks as they finish
            x.outcome.tokens = list(x.before)
            self._refuse(x.request, x.outcome, RuntimeError(
                f"the KV pool cannot hold the request's {len(tokens)} tokens ({need} blocks of "
                f"{self.pool.block_size} per CP rank, {self.kv.available()} available): raise "
                "--kv-cache-memory or --cp"), done)  # fmt: skip
            return True
        if rank is not None and not self._fits_rank(rank, len(tokens) - shared):
            if self.sched.seqs:
                return False  # its rank frees blocks as its requests finish
            rank = None  # (alone, the ring's pools are the most it can get)
        seq = None
        if moving is not None:  # its prefix, all on that rank, spreads over the ring
            seq = self.kv.reshard(holder, shared, moving)
        if seq is None:
            seq, shared, copies = self.kv.start(holder, shared)
            self.cache.copy_tail(copies)  # (the followers copy theirs when they replay it)
        state = SequenceState(seq=seq, history=tokens[:shared], owner=x, rank=rank)
        x.state = state
        self.placements["rank" if rank is not None else "ring"] += 1
        if moving is not None:  # a chat that grew past the threshold: onto the ring
            self.placements["moved"] += 1
            logger.info("request %d: %d tokens, its prefix on one rank: moves onto the ring",
                        x.request.rid, len(tokens))  # fmt: skip
        if x.first_run:  # a recomputed request keeps what it reported first
            x.outcome.cached_tokens = min(shared, len(x.request.tokens))
        self.stats.prefix_queries += len(tokens)
        self.stats.prefix_hits += shared
        budget = x.request.sampling.max_new_tokens - len(x.before)
        self.sched.admit(state, tokens[shared:], budget, x.request.sampling.eos_ids)
        return True

    def _can_move(self, holder: int, shared: int, tokens: int) -> bool:
        """Whether moving ``holder``'s first ``shared`` tokens (on one CP rank) onto the ring
        for a prompt of ``tokens`` beats prefilling them again: they fill a block at least,
        and the pool holds the copy and the prompt's new tokens while the holder stays pinned
        (until the plan that copies it has run, its blocks cannot be reclaimed)."""
        copy = max(self.pool.spread_needs(shared))
        return self._worth_pinning(
            holder, shared, self.kv.blocks_for_tokens(tokens - shared) + copy
        )

    def _worth_pinning(self, holder: int, shared: int, blocks: int) -> bool:
        """Whether a request should keep ``holder`` pinned for its first ``shared`` tokens
        while ``blocks`` more are taken (a move onto the ring, a KV tier's read): they fill a
        block at least, and the pool holds those blocks beside the holder, whose own cannot be
        reclaimed while it is pinned. Else its prefix is better computed (or read) again."""
        return shared >= self.pool.block_size and (
            blocks + self.kv.held_back(holder) + self._promised() <= self.kv.available()
        )

    # -- placement ----------------------------------------------------------------------------
    def _place(
        self, x: _Live, tokens: list[int], holder: int | None, shared: int
    ) -> tuple[int | None, int | None, bool]:
        """The CP rank ``x`` runs on alone, or None for the ring (see ``ring_min_tokens``); the
        rank whose prefix it moves onto the ring (None: it moves none); whether it keeps its
        cached prefix (False: prefilled again).

        A request whose cached prefix is on the ring stays there; one whose prefix is on one
        rank goes to that rank unless it is now long enough for the ring (a chat moves onto
        it, its K/V resharded), or unless that rank's load exceeds the least-loaded one's by
        more than the prefix (prefilling the prefix again there costs less than waiting).
        Otherwise the least-loaded rank, by tokens in flight, then KV blocks held. (A
        preempted request is placed afresh: every rank's generator of it drew alike.)"""
        cp = self.pool.cp
        if cp == 1 or not self.placeable or self.ring_min_tokens == 0:
            return None, None, True
        prefix = None
        if holder is not None and shared:
            ranks = [r for r, g in enumerate(self.pool.ledgers) if g.count_below(holder, shared)]
            if len(ranks) > 1:
                return None, None, True
            prefix = ranks[0] if ranks else None
        if self._ring_wants(len(tokens), x):
            return None, prefix, True
        least, load = self._least_loaded()
        if prefix is not None and load[prefix] - load[least] <= shared:
            return prefix, None, True
        return least, None, prefix is None

    def _least_loaded(self) -> tuple[int, list[int]]:
        """The CP rank with the least work placed on it, and every rank's: the context tokens
        of its running requests and their tokens still to prefill (then KV blocks held, then
        requests)."""
        cp = self.pool.cp
        load = [0] * cp
        count = [0] * cp
        for s in self.sched.seqs:
            if s.rank is not None:
                context = len(s.history) + len(s.prompt) + len(s.out)
                load[s.rank] += context + len(s.new) - s.prefilled
                count[s.rank] += 1
        used = [self.pool.n_blocks - g.n_free for g in self.pool.ledgers]
        return min(range(cp), key=lambda r: (load[r], used[r], count[r], r)), load

    def _ring_wants(self, context: int, x: _Live) -> bool:
        """Whether a request of ``context`` tokens goes on the ring: it is at least the
        threshold long, or its KV would not fit one rank's pool."""
        whole = self.kv.blocks_for_tokens_on_one(context + x.request.sampling.max_new_tokens)
        return context >= self.ring_threshold or whole > self.pool.n_blocks

    def _fits_rank(self, rank: int, tokens: int) -> bool:
        """Whether ``rank``'s pool holds ``tokens`` more beside the prefills promised there."""
        g = self.pool.ledgers[rank]
        promised = sum(
            self.kv.blocks_for_tokens_on_one(len(s.new) - s.prefilled) if s.rank == rank
            else self.kv.blocks_for_tokens(len(s.new) - s.prefilled)
            for s in self.sched.seqs if s.prefilled < len(s.new)
        )  # fmt: skip
        return self.kv.blocks_for_tokens_on_one(tokens) + promised <= g.n_free + g.reclaimable

    # -- memory -------------------------------------------------------------------------------
    def _preempt(self, done: Done | None) -> bool:
        """Free the most recently admitted request's blocks and queue it to be recomputed;
        False when it is the only one running (it cannot fit alone: it fails instead)."""
        running = [s for s in self.sched.seqs if not s.done]
        if not running:
            return False
        x = running[-1].owner
        if len(running) == 1:
            x.state.done = True
            x.outcome.finish_reason = "error"
            x.outcome.error = (
                f"the KV pool ({self.pool.n_blocks} blocks of {self.pool.block_size} tokens per "
                "CP rank) cannot hold this request alone: raise --kv-cache-memory or --cp"
            )
            logger.warning("request %d failed: %s", x.request.rid, x.outcome.error)
            return False
        state = self.sched.drop(x.state.seq)
        self.kv.release(state.seq)
        x.before += state.out
        x.state = None
        self.waiting.appendleft(x)
        self.stats.preemptions += 1
        logger.info("request %d preempted (KV pool full): %d tokens to recompute",
                    x.request.rid, len(x.tokens))  # fmt: skip
        return True

    def _retire(self, done: Done | None) -> None:
        """Requests that are done leave; their sequences stay cached for reuse, retained until
        the pool needs their blocks (cancelled and failed ones are freed)."""
        finished = [x for x in self.live.values() if x.state.done]
        for x in finished:
            s = self.sched.retire(x.state.seq)
            s.owner = None
            o = x.outcome
            o.tokens = x.before + s.out
            if o.finish_reason in ("cancelled", "error"):
                self.kv.release(s.seq)
                continue
            o.finish_reason = "stop" if o.tokens and o.tokens[-1] in s.eos_ids else "length"
            o.seq = s.seq
            self.kv.retain(s.seq, s.history[: s.cached])
            logger.debug(
                "request %d: %d prompt tokens (%d cached), %d generated",
                x.request.rid, o.prompt_tokens, o.cached_tokens, len(o.tokens),
            )  # fmt: skip
        self._finish(finished, done)
