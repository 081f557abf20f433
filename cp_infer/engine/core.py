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
from dataclasses import replace

import torch
import torch.distributed as dist

from cp_infer import costmodel
from cp_infer.attention import VARIANTS
from cp_infer.distributed import RankFailure, announce_failure, error_message, exit_now
from cp_infer.engine.admission import Admission, _Live
from cp_infer.engine.channel import PlanChannel
from cp_infer.engine.chunking import ChunkTimer, StepCosts
from cp_infer.engine.connector import KVConnector
from cp_infer.engine.iteration import Iterations
from cp_infer.engine.kv_manager import KVCacheManager
from cp_infer.engine.plan import Control, StepPlan
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
from cp_infer.engine.scheduler import Scheduler
from cp_infer.engine.tiering import TierReads
from cp_infer.engine.worker import PlanResult, Worker

__all__ = ["EngineCore", "Outcome", "Request", "Step", "check_pool", "check_request"]

logger = logging.getLogger(__name__)

SPAN = 4  # iterations between the leader's looks at its door (new requests, cancellations)
#: A rank that failed a plan and heard nothing of its peers within this many seconds is out of
#: step with them (they wait in a collective it will never join): it stops.
ALONE_AFTER_S = 15.0


class _PassFailed(Exception):
    """The leader's own execution of a plan raised (its followers may be inside the pass)."""


class EngineCore(Admission, Iterations):
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
        group: the engine's process group (default: the ranks of this model replica,
            ``pg.replica_group``); its rank 0 leads.
        ring_min_tokens: where requests run. ``0``: every request on the ring (each prefill
            split over the CP ranks, each decode attended over them). ``N``: a request whose
            context is at least N tokens runs on the ring, a shorter one on a single CP rank
            (the least loaded; all its KV there, local attention, no CP collective: the
            ranks serve such requests data-parallel). ``"auto"``: N is where the hardware
            model's ring prefill beats one rank's (:func:`cp_infer.costmodel.ring_min_tokens`).
            A request whose KV would not fit one rank goes on the ring; a chat's next turn
            goes where its prefix is, onto the ring once it has grown past N.
    """

    def __init__(
        self, runner: ModelRunner, *, max_batch: int = 8, tbt_slo_s: float | None = None,
        costs: StepCosts | None = None, fuse: bool = True, variant: str = "auto",
        prefill_chunk: int | None = None, progress: bool = False, share_prefixes: bool = True,
        group=None, ring_min_tokens: int | str = 0,
    ) -> None:  # fmt: skip
        self.configure(variant=variant, prefill_chunk=prefill_chunk, progress=progress)
        self.runner = runner
        self.cfg = runner.cfg
        self.pg = runner.pg
        self.cache = runner.cache
        self.pool = runner.cache.pool
        group = group if group is not None else runner.pg.replica_group
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
        # prefixes read back from a KV tier (the leader's; see cp_infer.engine.tiering)
        self.tiering: TierReads | None = None
        self.ring_min_tokens, self.ring_threshold = (
            ring_min_tokens,
            self._threshold(ring_min_tokens),
        )
        # requests may run on one CP rank unless the experts' all-to-all spans the CP ranks
        self.placeable = self.pg.cp > 1 and not (self.cfg.is_moe and self.pg.ep > 1)
        self.placements: Counter[str] = Counter()  # "ring", "rank", "moved" (onto the ring)

    def _threshold(self, ring_min_tokens: int | str) -> int:
        """The context length from which a request goes on the ring (see the class)."""
        if ring_min_tokens == "auto":
            if self.pg.cp == 1:
                return 0
            n = costmodel.ring_min_tokens(
                self.cfg, self.runner.hardware, cp=self.pg.cp, tp=self.pg.tp,
                bytes_per_element=self.runner.dtype.itemsize,
            )  # fmt: skip
            n = (1 << 62) if n is None else n
            if self.leader:
                logger.info("ring threshold (hardware model %s, cp=%d): %d tokens",
                            self.runner.hardware.name, self.pg.cp, n)  # fmt: skip
            return n
        if not isinstance(ring_min_tokens, int) or ring_min_tokens < 0:
            raise ValueError(
                f"ring_min_tokens must be a token count >= 0 or 'auto', got {ring_min_tokens!r}"
            )
        return ring_min_tokens

    def placement_stats(self) -> dict[str, object]:
        """Requests by placement, migrations onto the ring, and each CP rank's load now."""
        load = [0] * self.pg.cp
        running = [0] * self.pg.cp
        for s in self.sched.seqs:
            ranks = range(self.pg.cp) if s.rank is None else (s.rank,)
            for r in ranks:
                running[r] += 1
                load[r] += (len(s.history) + len(s.prompt) + len(s.out)) // len(ranks)
        return {**{k: self.placements[k] for k in ("ring", "rank", "moved")},
                "rank_running": running, "rank_tokens": load}  # fmt: skip

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
        return bool(self.sched.seqs or self.waiting or (self.remote and self.remote.jobs)
                    or (self.tiering and self.tiering.jobs))  # fmt: skip

    @property
    def runnable(self) -> bool:
        """Something to compute now (not only prompts away at the prefill tier)."""
        return (
            bool(self.sched.seqs or self.waiting)
            or bool(self.connector is not None and self.connector.arrived())
            or bool(self.tiering is not None and self.tiering.ready())
        )

    @property
    def room(self) -> int:
        """Requests that may still be handed in (the waiting ones count)."""
        return max(self.max_batch - len(self.sched.seqs) - len(self.waiting), 0)

    def live_requests(self) -> set[int]:
        return ({x.request.rid for x in self.live.values()} | {x.request.rid for x in self.waiting}
                | set(self.remote.jobs if self.remote else ())
                | {j.x.request.rid for j in (self.tiering.jobs.values() if self.tiering else ())})  # fmt: skip

    def pool_stats(self) -> PoolStats:
        """The pool and prefix reuse now (the leader sends them to the API's metrics)."""
        if self.connector is not None:
            self.stats.handoff_tokens = self.connector.token_heads
        placed = self.placement_stats()
        tier = vars(self.tiering.stats) if self.tiering is not None else {}
        return replace(
            self.kv.snapshot(), ring_requests=placed["ring"], rank_requests=placed["rank"],
            ring_moves=placed["moved"], rank_running=tuple(placed["rank_running"]),
            rank_tokens=tuple(placed["rank_tokens"]),
            **{f"tier_{k}": v for k, v in tier.items()},
        )  # fmt: skip

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
            if self.tiering is not None:
                self.tiering.land(done)  # prefixes read back from the KV tier
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
            self.kv.settle()

    def heartbeat(self) -> None:
        """The leader, idle: keep the followers from their process group's timeout."""
        self._send(Control("idle"))

    def idle_for(self) -> float:
        """Seconds since the leader last sent anything."""
        return time.monotonic() - self._sent_at

    def spill_retained(self) -> int:
        """The leader, stopping: with a KV tier, the sequences the pool keeps for reuse go to
        it (a restart on the tier finds them); returns how many were spilled."""
        if self.tiering is None:
            return 0
        before = self.tiering.stats.store_bytes
        n = self.tiering.spill_all()
        if n:
            logger.info("KV tier: %d retained sequences spilled (%.1f MiB) before stopping", n,
                        (self.tiering.stats.store_bytes - before) / 2**20)  # fmt: skip
        return n

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
                if not waiting and not self.runnable:  # only reads from a KV tier pending
                    time.sleep(0.001)
                    if self.idle_for() >= 1.0:
                        self.heartbeat()
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
            result = self.worker.execute(plan, emit, after_layer=after_layer)
            self.kv.settle()  # (a reshard's sources are copied)
            return result
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
