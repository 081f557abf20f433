"""The engine core: continuous batching of independent requests, with mixed prefill/decode
iterations and automatic reuse of the KV cache that earlier requests left on the CP ranks.
Every front door drives this one class: the server (:class:`cp_infer.serving.loop.ServeLoop`),
:func:`cp_infer.engine.generate` (its requests submitted up front: :meth:`EngineCore.run`),
and the benchmarks.

One scheduler decides, every rank executes. The engine group's rank 0 *leads*: it alone admits
requests, matches prefixes, evicts, preempts, sizes chunks, chooses the ring variant and routes
long prompts to a prefill tier, with one set of books (:class:`~cp_infer.engine.kv_manager.
KVCacheManager`). Each iteration it sends one :class:`~cp_infer.engine.plan.StepPlan` over the
group's :class:`~cp_infer.engine.channel.PlanChannel`; every rank, the leader included, executes
it (:class:`~cp_infer.engine.worker.Worker`). The other ranks *follow* (:meth:`follow`): they
keep no scheduler, no prefix index and no timers, only their ledgers, which replay the plan's
changes, and each request's sampling generator. Nothing they hold can drift from the leader's
choices, and nothing is sent back unless a rank fails a plan.

An iteration is one decode step of the running requests, then one prefill step of the waiting
ones (Mnemosyne's mixed batching). Without a TBT target the waiting prompts prefill whole (or in
``prefill_chunk`` pieces); with ``tbt_slo_s`` the prefill takes the largest chunk that keeps the
iteration, which is the running requests' time between tokens, under the target
(:mod:`cp_infer.engine.chunking`). A request joins the decodes once its prompt is prefilled and
leaves when it is done.

KV memory. The KV cache is a pool of blocks per rank, allocated once
(:mod:`cp_infer.engine.kv_pool`). A request waits until the pool can hold its prompt besides
what the running requests still have to prefill (first come, first served). When a step's
tokens do not fit, the core first evicts retained sequences (least recently used first; only
blocks no running request holds are freed), then preempts the most recently admitted request:
its blocks are freed and it waits at the head of the queue to be recomputed (its prompt and what
it generated so far, prefilled again), as vLLM does. A request that cannot fit even alone is
refused.

Prefix sharing. Every sequence whose tokens are cached, running (once its prompt is prefilled)
or finished (*retained*), is found by its tokens. A new request starts from the sequence sharing
the longest prefix with it, at token granularity: the whole blocks of that prefix are shared
(reference counts), the tokens of a partly shared block are copied, and only the rest is
prefilled, over the shared prefix (persistent-KV prefill, variant by the hardware model). Any
number of requests share a prefix's blocks; a request whose prompt starts like one being
prefilled now waits for that prefill instead of repeating it (``n`` choices prefill once). A
request whose tokens are all cached recomputes its last one, which yields the first logits. A
chat's next turn is such a request: its whole history, of which only the new turn is computed.

Failures. A request's own failure (its sampling, say) ends that request alone. A plan that fails
on every rank alike (each follower reports it in the store; the leader, having failed it too,
finds every report) ends the requests in flight, and the engine goes on. A rank that fails a
plan the others did not is out of step with them (they wait in a collective it left): it stops,
so that the server's watchdog sees it gone instead of waiting for the process-group timeout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cp_infer.attention import VARIANTS
from cp_infer.distributed import RankFailure, announce_failure, error_message, exit_now
from cp_infer.engine.channel import PlanChannel
from cp_infer.engine.chunking import ChunkTimer, Estimates, StepCosts, choose_chunk
from cp_infer.engine.connector import KVConnector
from cp_infer.engine.kv_manager import KVCacheManager, common_prefix
from cp_infer.engine.plan import Control, Draws, StepPlan
from cp_infer.engine.remote import RemotePrefills
from cp_infer.engine.request import (
    Done,
    Emit,
    Outcome,
    PoolStats,
    Request,
    Step,
    check_pool,
    check_request,
)  # fmt: skip
from cp_infer.engine.runner import ModelRunner
from cp_infer.engine.scheduler import Scheduler, SequenceState
from cp_infer.engine.worker import Drawn, PlanResult, Worker

__all__ = ["EngineCore", "Outcome", "Request", "Step", "check_pool", "check_request"]

logger = logging.getLogger(__name__)

SPAN = 4  # iterations between the leader's looks at its door (new requests, cancellations)
#: A rank that failed a plan and heard nothing of its peers within this many seconds is out of
#: step with them (they wait in a collective it will never join): it stops.
ALONE_AFTER_S = 15.0


class _PassFailed(Exception):
    """The leader's own execution of a plan raised (its followers may be inside the pass)."""


@dataclass
class _Live:
    """A request in flight: waiting for admission, or running (``state`` set)."""

    request: Request
    outcome: Outcome
    state: SequenceState | None = None
    admitted: float = 0.0  # perf_counter when it arrived
    before: list[int] = field(default_factory=list)  # generated before it was preempted
    waited: bool = False  # it waited for room in the pool

    @property
    def tokens(self) -> list[int]:
        """What its sequence must hold before the next token: the prompt, and what was
        generated before a preemption (recomputed)."""
        return [*self.request.tokens, *self.before]

    @property
    def prompt_logprobs(self) -> bool:
        """Its prefill returns the prompt's log-probabilities (once: not when recomputed)."""
        return self.request.logprobs and not self.before

    @property
    def generated(self) -> int:
        return len(self.before) + (len(self.state.out) if self.state is not None else 0)


class EngineCore:
    """The engine on this rank: the leader's scheduler and books on rank 0 of the group, the
    executor of its plans everywhere (see the module docstring).

    Args:
        runner: this rank's model runner (it owns the KV cache and its pool).
        max_batch: requests in flight at most (prefilling or decoding).
        tbt_slo_s: the time-between-tokens target that sizes prefill chunks while requests
            decode; None: waiting prompts prefill whole.
        costs: the predicted step costs the chunks are sized from (default: from the
            runner's hardware profile).
        fuse: run an iteration's decode step and prefill chunk as one forward pass (the
            GEMMs read the weights once for both); False: two passes.
        variant: the prefill's ring variant: ``"pass-kv"``, ``"pass-q"``, or ``"auto"`` (the
            faster one by the hardware model, per step, from its new and cached tokens).
        prefill_chunk: without a TBT target, prefill at most this many tokens of each prompt
            per iteration (sequence pipeline parallelism, say); None: whole.
        progress: a per-layer progress bar on prefill steps that take over a second.
        share_prefixes: start requests from the cached sequence they share a prefix with;
            False: every request prefills its whole prompt (a cold baseline).
        group: the engine's process group (default: the default group); its rank 0 leads.
    """

    def __init__(
        self, runner: ModelRunner, *, max_batch: int = 8, tbt_slo_s: float | None = None,
        costs: StepCosts | None = None, fuse: bool = True, variant: str = "auto",
        prefill_chunk: int | None = None, progress: bool = False, share_prefixes: bool = True,
        group=None,
    ) -> None:  # fmt: skip
        self.configure(variant=variant, prefill_chunk=prefill_chunk, progress=progress)
        self.runner = runner
        self.cfg = runner.cfg
        self.pg = runner.pg
        self.cache = runner.cache
        self.pool = runner.cache.pool
        self.channel = PlanChannel(group, timeout_s=max(runner.timeout_s, 60.0))
        self.leader = self.channel.leader
        self.worker = Worker(runner, leader=self.leader)
        # the leader's books (a follower's stay empty: its ledgers replay the plans)
        self.kv = KVCacheManager(self.pool, share_prefixes=share_prefixes, record=True)
        self.stats = self.kv.stats
        self.waiting: deque[_Live] = deque()  # arrived, not admitted (preempted ones first)
        self.max_batch, self.tbt_slo_s, self.fuse = max_batch, tbt_slo_s, fuse
        self.costs = costs or StepCosts.from_hardware(
            self.cfg, runner.hardware, cp=self.pg.cp, tp=self.pg.tp
        )
        self.timer = ChunkTimer(self.costs)
        self.sched = Scheduler(cp=self.pg.cp, device=runner.device)
        self._mixed: tuple[float, float] | None = None  # the last mixed iteration's start, sizing
        self._announce: list[tuple[int, object]] = []  # (rid, sampling) the workers learn next
        self._plans = 0  # plans sent
        self.iterations = 0  # of them, iterations (with forward passes)
        # host seconds the leader spent per part of its iterations: deciding (up to the plan),
        # sending it, executing it (the worker's), recording the tokens (tools/bench_step.py)
        self.host_s: Counter[str] = Counter()
        self._agreed: int | None = None  # a failed plan every rank failed: followers go on
        self._sent_at = time.monotonic()
        # a request's failure ends that request alone (serving); offline it ends the run
        self.contain = True
        # long prompts prefilled elsewhere (disaggregated serving): see connect()
        self.remote: RemotePrefills | None = None

    def connect(self, connector: KVConnector) -> None:
        """Prefill prompts of ``connector.min_tokens`` new tokens or more through ``connector``
        (another engine prefills them; this one adopts their K/V and decodes). Every rank of
        the group connects its own (each receives its share of the K/V)."""
        self.remote = RemotePrefills(self, connector)
        self.worker.connector = connector

    @property
    def connector(self) -> KVConnector | None:
        return None if self.remote is None else self.remote.connector

    def configure(self, *, variant: str, prefill_chunk: int | None, progress: bool) -> None:
        """How prefills run from now on (``generate`` sets them per call); checked here."""
        if variant not in (*VARIANTS, "auto"):
            raise ValueError(f"unknown variant {variant!r}; choose one of {[*VARIANTS, 'auto']}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"the prefill chunk must be >= 1 token, got {prefill_chunk}")
        self.variant, self.prefill_chunk, self.progress = variant, prefill_chunk, progress

    # -- the leader's view --------------------------------------------------------------------
    @property
    def live(self) -> dict[int, _Live]:
        """The running requests by sequence, in order of admission: the scheduler's running
        sequences are the one registry, each carrying its request's record."""
        return {s.seq: s.owner for s in self.sched.seqs}

    @property
    def busy(self) -> bool:
        return bool(self.sched.seqs or self.waiting or (self.remote and self.remote.jobs))

    @property
    def runnable(self) -> bool:
        """Something to compute now (not only prompts away at the prefill tier)."""
        return bool(self.sched.seqs or self.waiting) or bool(
            self.connector is not None and self.connector.arrived()
        )

    @property
    def room(self) -> int:
        """Requests that may still be handed in (the waiting ones count)."""
        return max(self.max_batch - len(self.sched.seqs) - len(self.waiting), 0)

    def live_requests(self) -> set[int]:
        return ({x.request.rid for x in self.live.values()} | {x.request.rid for x in self.waiting}
                | set(self.remote.jobs if self.remote else ()))  # fmt: skip

    def pool_stats(self) -> PoolStats:
        """The pool and prefix reuse now (the leader sends them to the API's metrics)."""
        if self.connector is not None:
            self.stats.handoff_tokens = self.connector.token_heads
        return self.kv.snapshot()

    # -- the leader's door --------------------------------------------------------------------
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

    # -- the leader's loop --------------------------------------------------------------------
    @torch.no_grad()
    def iterate(
        self, emit: Emit | None = None, done: Done | None = None,
        interrupt: Callable[[], bool] | None = None, *,
        on_step: Callable[[Step], None] | None = None,
        failed_alone: Callable[[str], None] | None = None, after_layer=None,
    ) -> None:  # fmt: skip
        """The leader: up to :data:`SPAN` iterations, each one plan sent and executed.

        Args:
            emit: called with [(rid, token, logprob)] as each pass's tokens are drawn; logprob
                is (its log-probability, [(id, logprob)] of the most likely) for a request with
                ``top_logprobs``, else None.
            done: called with finished requests and their outcomes.
            interrupt: true when the span should end before its next iteration (the door has
                news: a client left, a request waits for a free slot).
            on_step: told of every forward pass (:class:`Step`).
            failed_alone: called when this rank failed a plan its followers did not (default:
                exit at once).
            after_layer: ``after_layer(batch, layer)`` after each layer of a prefill pass.
        """
        try:
            self._retire(done)  # cancelled ones leave before they cost a step
            for i in range(SPAN):
                if i and interrupt is not None and interrupt():
                    break
                self._admit_waiting(done)
                if not self.sched.seqs:
                    self._mixed = None
                    break
                t0 = time.perf_counter()
                if self._mixed is not None:  # how far off the last mixed iteration's sizing
                    start, predicted = self._mixed  # was, start to start: the decodes' TBT
                    self.timer.iteration(t0 - start, predicted)
                predicted = self._iteration(emit, done, on_step, after_layer)
                self._mixed = None if predicted is None else (t0, predicted)
                self._retire(done)
        except _PassFailed as e:
            if not self.contain:
                raise
            failure = self._agree(e.__cause__, failed_alone)
            self._drop_in_flight(str(failure), done)
        self.flush()  # the books' changes since the last plan reach the followers now

    def flush(self) -> None:
        """The leader: send what the followers must learn before the next pass (freed blocks,
        a prompt sent to the prefill tier, an agreed failure) as a plan with no pass."""
        if self.kv.ops or self._announce or self._agreed is not None:
            plan = self._plan()
            self._send(plan)
            self.worker.execute(plan)

    def heartbeat(self) -> None:
        """The leader, idle: keep the followers from their process group's timeout."""
        self._send(Control("idle"))

    def idle_for(self) -> float:
        """Seconds since the leader last sent anything."""
        return time.monotonic() - self._sent_at

    def stop_followers(self, payload=None) -> None:
        """The leader: the run is over; followers return ``payload`` from :meth:`follow`."""
        self.flush()
        self._send(Control("stop", payload))

    # -- every other rank ---------------------------------------------------------------------
    @torch.no_grad()
    def follow(
        self, emit: Emit | None = None, *, failed_alone: Callable[[str], None] | None = None,
        after_layer=None,
    ):  # fmt: skip
        """A follower: execute the leader's plans until it says stop; returns what it sent
        with the stop. A plan this rank fails is reported; unless the leader then says every
        rank failed it, this rank is out of step and stops (``failed_alone``)."""
        failed, timer, error = None, None, None
        try:
            while True:
                t0 = time.perf_counter()
                message = self.channel.recv()
                self.host_s["recv"] += time.perf_counter() - t0
                if failed is not None:  # go on only if the leader says every rank failed it
                    if not (isinstance(message, StepPlan) and message.agreed == failed):
                        self._failed_alone(error, failed_alone)
                        return None
                    timer.cancel()
                    failed = timer = None
                if isinstance(message, Control):
                    if message.kind == "stop":
                        return message.payload
                    if message.kind == "error":
                        raise RankFailure(message.payload)
                    continue
                try:
                    self.worker.execute(message, emit, after_layer=after_layer)
                except Exception as e:
                    if not message.contain:
                        raise
                    logger.exception("plan %d failed on this rank", message.n)
                    error, failed = e, message.n
                    self.channel.report(failed, error_message(e))
                    timer = threading.Timer(ALONE_AFTER_S, self._failed_alone,
                                            args=(e, failed_alone))  # fmt: skip
                    timer.daemon = True
                    timer.start()
        finally:
            if timer is not None:
                timer.cancel()

    # -- offline: every request up front ------------------------------------------------------
    @torch.no_grad()
    def run(
        self, requests: Sequence[Request], emit: Emit | None = None, *,
        on_step: Callable[[Step], None] | None = None, contain: bool = False, after_layer=None,
    ) -> tuple[list[Outcome], list[Step]]:  # fmt: skip
        """Run ``requests`` to the end, admitting each as a slot frees; the same call on every
        rank (generate's and the benchmarks' door): the leader leads, the others follow, and
        every rank returns the leader's outcomes (each with its own last stage's
        ``first_logits``).

        Args:
            emit: called on every rank with [(rid, token, logprob)] as each pass's tokens are
                drawn (as :meth:`iterate`'s).
            on_step: the leader: told of every forward pass.
            contain: a request's failure ends that request alone (its outcome says why);
                False: the run fails.
            after_layer: ``after_layer(batch, layer)`` on every rank after each layer of a
                prefill pass (a prefill tier streams its K/V).

        Returns:
            the outcomes in request order, and every step that ran.

        Raises:
            RuntimeError: a request failed (``contain=False``); every rank raises alike.
        """
        if self.leader:
            payload = self._lead_run(requests, emit, on_step, contain, after_layer)
        else:
            payload = self.follow(emit, after_layer=after_layer)
        outcomes, steps = payload
        for o, r in zip(outcomes, requests, strict=True):
            o.first_logits = self.worker.first_logits.pop(r.rid, None)
        failed = [(r.rid, o.error) for r, o in zip(requests, outcomes, strict=True) if o.error]
        if failed and not contain:
            raise RuntimeError(f"request {failed[0][0]} failed: {failed[0][1]}")
        return outcomes, steps

    def _lead_run(self, requests, emit, on_step, contain, after_layer):
        outcomes: dict[int, Outcome] = {}
        steps: list[Step] = []

        def done(reqs: list[Request], results: dict[int, Outcome]) -> None:
            outcomes.update(results)

        def stepped(step: Step) -> None:
            steps.append(step)
            if on_step is not None:
                on_step(step)

        waiting = list(requests)
        self.contain = contain
        try:
            while waiting or self.busy:
                admit, waiting = waiting[: self.room], waiting[self.room :]
                self.submit(admit, done)
                self.iterate(emit, done, on_step=stepped, after_layer=after_layer)
        except _PassFailed as e:  # the followers may be inside the pass: nothing reaches them
            raise e.__cause__ from None
        except Exception as e:  # the leader's own bookkeeping: the followers wait for a word
            with contextlib.suppress(Exception):  # (unless the group is what broke)
                self._send(Control("error", error_message(e)))
            raise
        finally:
            self.contain = True
        result = ([outcomes[r.rid] for r in requests], steps)
        self.stop_followers(result)
        return result

    # -- plans --------------------------------------------------------------------------------
    def _plan(self, **passes) -> StepPlan:
        self._plans += 1
        plan = StepPlan(
            n=self._plans, ops=tuple(self.kv.ops), sampling=tuple(self._announce),
            progress=self.progress, contain=self.contain, agreed=self._agreed, **passes,
        )  # fmt: skip
        self.kv.ops.clear()
        self._announce.clear()
        self._agreed = None
        return plan

    def _send(self, message) -> None:
        t0 = time.perf_counter()
        self._sent_at = time.monotonic()
        self.channel.send(message)
        self.host_s["send"] += time.perf_counter() - t0

    def _execute(self, plan: StepPlan, emit, after_layer) -> PlanResult:
        """Send ``plan`` and run it here; a failure of either (a follower gone breaks the
        send) is a :class:`_PassFailed`."""
        try:
            self._send(plan)
            return self.worker.execute(plan, emit, after_layer=after_layer)
        except Exception as e:
            if self.contain:
                logger.exception("plan %d failed on the leader", plan.n)
            raise _PassFailed() from e

    def _agree(self, error: BaseException, failed_alone) -> RankFailure:
        """The leader failed a plan: did every follower fail it too? Then it is agreed (the
        next plan says so); else the leader failed alone and stops."""
        n = self._plans
        messages = self.channel.reports(n, ALONE_AFTER_S)
        if messages is None:
            self._failed_alone(error, failed_alone)
            return RankFailure(error_message(error))
        self._agreed = n
        everyone = [error_message(error), *messages]
        message = everyone[0]
        if len(set(everyone)) > 1:
            message = f"rank 0: {message}"
        return RankFailure(message)

    def _drop_in_flight(self, why: str, done: Done | None) -> None:
        """A plan failed on every rank: the requests in flight are in an unknown state."""
        failed = [*self.live.values(), *self.waiting]
        for s in self.sched.seqs:
            self.kv.release(s.seq)
        self.sched.seqs.clear()
        self.waiting.clear()
        for x in failed:
            x.outcome.finish_reason, x.outcome.error = "error", why
        self._finish(failed, done)

    def _failed_alone(self, error: BaseException, failed_alone) -> None:
        """This rank failed a plan and its peers did not say so: they are blocked in a step
        this rank left. Nothing can bring them back in step; stop this rank so that they see
        it gone (the server's watchdog does) instead of waiting for the process-group timeout."""
        message = (
            f"rank {dist.get_rank() if dist.is_initialized() else 0} failed alone in a step "
            f"({error_message(error)}); its peers are blocked in that step: stopping it"
        )
        logger.error("%s", message)
        announce_failure(message)
        (failed_alone or (lambda _message: exit_now(1)))(message)

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
        self.waiting.append(_Live(req, outcome, admitted=time.perf_counter()))

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
        seq, shared, copies = self.kv.start(holder, shared)
        self.cache.copy_tail(copies)  # (the followers copy theirs when they replay the fork)
        state = SequenceState(seq=seq, history=tokens[:shared], owner=x)
        x.state = state
        if not x.before:  # a recomputed request keeps what it reported first
            x.outcome.cached_tokens = shared
        self.stats.prefix_queries += len(tokens)
        self.stats.prefix_hits += shared
        budget = x.request.sampling.max_new_tokens - len(x.before)
        self.sched.admit(state, tokens[shared:], budget, x.request.sampling.eos_ids)
        return True

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

    # -- one iteration ------------------------------------------------------------------------
    def _iteration(self, emit, done: Done | None, on_step, after_layer) -> float | None:
        """One decode step of the running requests and one prefill step of waiting ones, in
        one forward pass when both run (``fuse``), each made to fit the pool first: decided
        here, sent as one plan, executed on every rank, then recorded. Returns the predicted
        time of a mixed iteration whose chunk the target sized."""
        t0 = time.perf_counter()
        sched, est = self.sched, self.timer.estimates
        decode = self._fit_decode(done)
        decoding = sched.decoding if decode is not None else []
        pending = [s for s in sched.seqs if s.prefilled < len(s.new) and not s.done]
        batch = None
        if pending:
            batch = self._fit_prefill(self._take(pending, est, decoding), decode, done)
        if decode is None and batch is None:
            return None
        fused = self.fuse and decode is not None and batch is not None
        live = self.live
        passes: dict = {"fused": fused}
        if decode is not None:
            passes["decode"] = decode
            passes["decode_draws"] = self._draws([live[seq] for seq in decode.seqs],
                                                 range(decode.n_seqs))  # fmt: skip
        lives, rows = [], []
        if batch is not None:
            lives = [live[seq] for seq in batch.seqs]
            rows = sched.prefilled(batch)  # the rows whose prompt this pass finishes
            asking = [x for x in lives if x.prompt_logprobs]
            passes["prefill"] = batch
            passes["prefill_draws"] = self._draws([lives[r] for r in rows], rows) if rows else None
            passes["prompt_logprobs"] = bool(asking)
            passes["prompt_top"] = max((x.request.top_logprobs or 0 for x in asking), default=0)
        plan = self._plan(**passes)
        self.iterations += 1
        t1 = time.perf_counter()
        result = self._execute(plan, emit, after_layer)
        t2 = time.perf_counter()
        self.host_s["decide"] += t1 - t0
        self.host_s["execute"] += t2 - t1
        if decode is not None:
            self._record(decode, range(decode.n_seqs), result.decode)
            if not fused:
                self.timer.decode(result.decode_s)
                if on_step is not None:
                    on_step(Step("decode", result.decode_s, decode_tokens=decode.n_seqs))
        if batch is None:
            self.host_s["record"] += time.perf_counter() - t2
            return None
        if result.prompt is not None:
            prompt = result.prompt
            for j, x in enumerate(lives):
                if x.prompt_logprobs:
                    x.outcome.logprobs += prompt[0][j]
                    if x.outcome.top_logprobs is not None:  # none computed when no row asks
                        k = x.request.top_logprobs
                        tops = prompt[1][j] if prompt[1] is not None else [[]] * len(prompt[0][j])
                        x.outcome.top_logprobs += [alts[:k] for alts in tops]
        for row in rows:  # its prompt is cached: later requests may share it
            state = lives[row].state
            self.kv.prefilled(state.seq, state.history + state.prompt)
        if rows:
            self._record(batch, rows, result.prefill)
        seconds = result.prefill_s
        if fused:
            self.timer.mixed(seconds, batch.n_tokens, batch.n_cached)
        else:
            self.timer.prefill(seconds, batch.n_tokens, batch.n_cached)
        if on_step is not None:
            on_step(Step(
                "mixed" if fused else "prefill", seconds, prefill_tokens=batch.n_tokens,
                cached_tokens=batch.n_cached, decode_tokens=decode.n_seqs if fused else 0,
                variant=batch.variant,
            ))  # fmt: skip
        self.host_s["record"] += time.perf_counter() - t2
        if self.tbt_slo_s is None or not decoding:
            return None
        return est.iteration_s(self.costs, new=batch.n_tokens, cached=batch.n_cached,
                               **_decode_load(decoding))  # fmt: skip

    def _draws(self, lives: Sequence[_Live], rows: Sequence[int]) -> Draws:
        """What the workers draw for ``rows`` (the requests ``lives``) and share of them."""
        tops = tuple(x.request.top_logprobs for x in lives)
        return Draws(
            rows=tuple(rows), rids=tuple(x.request.rid for x in lives),
            generated=tuple(x.generated for x in lives), tops=tops,
            logprobs=any(x.request.wants_logprobs for x in lives),
            top=max((k or 0 for k in tops), default=0),
            keep_logits=frozenset(x.request.rid for x in lives if x.request.first_logits),
        )  # fmt: skip

    def _record(self, batch, rows: Sequence[int], drawn: Drawn | None) -> None:
        """The pass's tokens into the scheduler and the requests' outcomes (the workers have
        emitted them)."""
        live = self.live
        lives = [live[batch.seqs[r]] for r in rows]
        tokens = drawn.tokens if drawn is not None else []
        for j, x in enumerate(lives):
            if tokens[j] < 0:
                x.state.done = True
                x.outcome.finish_reason, x.outcome.error = "error", drawn.failed[j]
        before = [len(x.state.out) for x in lives]
        self.sched.record_rows(batch, {
            x.state.seq: t for x, t in zip(lives, tokens, strict=True) if t >= 0
        })  # fmt: skip
        for j, (x, n) in enumerate(zip(lives, before, strict=True)):
            if len(x.state.out) > n:
                if x.outcome.ttft_s is None:
                    x.outcome.ttft_s = time.perf_counter() - x.admitted
                if x.request.wants_logprobs:
                    x.outcome.logprobs.append(drawn.chosen[j])
                if x.outcome.top_logprobs is not None:
                    x.outcome.top_logprobs.append(drawn.alternatives[j][: x.request.top_logprobs])

    def _fit_decode(self, done: Done | None):
        """The decode step of the running requests, once every rank's pool has room for its
        tokens (retained sequences evicted, else the latest requests preempted); None if none
        decodes."""
        while self.sched.decoding:
            batch = self.sched.decode_batch()
            if self.kv.reclaim(self.kv.needs(batch)):
                return batch
            self._preempt(done)
        return None

    def _fit_prefill(self, take: dict[int, int], decode, done: Done | None):
        """The prefill step of ``take``, trimmed to what the pools hold beside the ``decode``
        step's tokens (one pass or two, the iteration stores both). While requests decode, the
        prompts that do not fit wait for them; when none decode, the latest requests are
        preempted. None: no prefill this iteration."""
        take = dict(take)
        extra = [] if decode is None else [decode]
        while take:
            batch = self.sched.prefill_batch(
                lambda new, cached: self.runner.resolve_variant(self.variant, new, cached),
                take=take,
            )
            if self.kv.reclaim(self.kv.needs(batch, *extra)):
                return batch
            if decode is not None:
                take.popitem()  # the latest prompt waits
                continue
            if not self._preempt(done):
                return None
            running = {s.seq for s in self.sched.seqs}
            take = {seq: n for seq, n in take.items() if seq in running}
        return None

    def _take(self, pending, est: Estimates, decoding) -> dict[int, int]:
        """Tokens each waiting prompt prefills this iteration, first come first served."""
        budget = None
        if self.tbt_slo_s is not None and decoding:
            head = pending[0]
            budget = choose_chunk(
                self.tbt_slo_s, self.costs, est, cached=head.cached + head.prefilled,
                left=sum(len(s.new) - s.prefilled for s in pending), **_decode_load(decoding),
            )  # fmt: skip
        take: dict[int, int] = {}
        for s in pending:
            left = len(s.new) - s.prefilled
            whole = s.owner.request.logprobs  # prompt logprobs need one pass
            if budget is None or (whole and not take):
                n = left if whole or self.prefill_chunk is None else min(left, self.prefill_chunk)
            elif whole or budget <= 0:
                break
            else:
                n = min(left, budget)
            take[s.seq] = n
            if budget is not None:
                budget -= n
        return take

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


def _decode_load(decoding: Sequence[SequenceState]) -> dict[str, int]:
    """The running decodes, as the chunk sizing weighs them."""
    return {
        "decode_batch": len(decoding),
        "decode_context": sum(len(s.history) + len(s.prompt) + len(s.out) for s in decoding),
    }
