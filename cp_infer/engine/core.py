"""The engine core: continuous batching of independent requests, run together by every rank,
with mixed prefill/decode iterations and automatic reuse of the KV cache that earlier requests
left on the CP ranks. Every front door drives this one class: the server (rank 0 leads, the
other ranks follow: :class:`cp_infer.serving.loop.ServeLoop`), :func:`cp_infer.engine.generate`
(its requests submitted up front: :meth:`EngineCore.run`), and the benchmarks.

Before each *span* of a few iterations every rank gets the same :class:`Orders` (requests to
admit, requests whose client left, timing estimates): from rank 0 when serving, from the caller's
own identical arguments offline. Every rank then runs the same :meth:`EngineCore.run_span`, so
the bookkeeping (which sequences run, which prefix a request reuses, how big a chunk is) is
identical everywhere without being sent around.

An iteration is one decode step of the running requests, then one prefill step of the waiting
ones (Mnemosyne's mixed batching). Without a TBT target the waiting prompts prefill whole (or in
``prefill_chunk`` pieces); with ``tbt_slo_s`` the prefill takes the largest chunk that keeps the
iteration, which is the running requests' time between tokens, under the target
(:mod:`cp_infer.engine.chunking`). A request joins the decodes once its prompt is prefilled and
leaves when it is done.

KV memory. The KV cache is a pool of blocks per rank, allocated once
(:mod:`cp_infer.engine.kv_pool`); every rank keeps the books of every CP rank's pool, so the
decisions below are taken alike everywhere with no exchange. A request waits until the pool can
hold its prompt besides what the running requests still have to prefill (first come, first
served). When a step's tokens do not fit, the core first evicts retained sequences (least
recently used first; only blocks no running request holds are freed), then preempts the most
recently admitted request: its blocks are freed and it waits at the head of the queue to be
recomputed (its prompt and what it generated so far, prefilled again), as vLLM does. A request
that cannot fit even alone is refused.

Prefix sharing. Every sequence whose tokens are cached, running (once its prompt is prefilled)
or finished (*retained*), is in a :class:`PrefixIndex`, found by its tokens. A new request starts
from the sequence sharing the longest prefix with it, at token granularity: the whole blocks of
that prefix are shared (reference counts), the tokens of a partly shared block are copied, and
only the rest is prefilled, over the shared prefix (persistent-KV prefill, variant by the hardware model).
Any number of requests share a prefix's blocks; a request whose prompt starts like one being
prefilled now waits for that prefill instead of repeating it (``n`` choices prefill once). A
request whose tokens are all cached recomputes its last one, which yields the first logits. A
chat's next turn is such a request: its whole history, of which only the new turn is computed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cp_infer.attention import VARIANTS
from cp_infer.distributed import (
    RankFailure,
    announce_failure,
    error_message,
    exit_now,
    on_all_ranks,
)  # fmt: skip
from cp_infer.engine.chunking import ChunkTimer, Estimates, StepCosts, choose_chunk
from cp_infer.engine.connector import KVConnector
from cp_infer.engine.kv_manager import KVCacheManager, PoolStats, common_prefix
from cp_infer.engine.remote import RemotePrefills
from cp_infer.engine.request import (
    Done,
    Emit,
    Outcome,
    Request,
    Step,
    check_pool,
    check_request,
)  # fmt: skip
from cp_infer.engine.runner import ModelRunner
from cp_infer.engine.sampling import sample_rows
from cp_infer.engine.scheduler import Scheduler, SequenceState

__all__ = [
    "EngineCore", "Orders", "Outcome", "Request", "Step", "check_pool", "check_request",
]  # fmt: skip

logger = logging.getLogger(__name__)

SPAN = 4  # iterations between rank 0's orders (new requests, cancellations, estimates)
#: A rank whose span failed while its peers did not report within this many seconds is out of
#: step with them (they wait in a collective it will never join): it stops (see run_span).
ALONE_AFTER_S = 15.0


@dataclass(frozen=True)
class Orders:
    """What rank 0 sends every rank before a span of iterations (picklable)."""

    requests: tuple[Request, ...] = ()
    cancelled: frozenset[int] = frozenset()  # request ids whose client left
    estimates: Estimates = field(default_factory=Estimates)
    arrived: tuple[int, ...] = ()  # requests whose prefill tier's hand-off is here


@dataclass
class _Live:
    """A request in flight: waiting for admission, or running (``state`` set)."""

    request: Request
    outcome: Outcome
    generator: torch.Generator
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


class EngineCore:
    """Runs the requests in flight on this rank's shard (call :meth:`run_span`, or :meth:`run`
    offline, on every rank alike).

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
    """

    def __init__(
        self, runner: ModelRunner, *, max_batch: int = 8, tbt_slo_s: float | None = None,
        costs: StepCosts | None = None, fuse: bool = True, variant: str = "auto",
        prefill_chunk: int | None = None, progress: bool = False, share_prefixes: bool = True,
    ) -> None:  # fmt: skip
        self.configure(variant=variant, prefill_chunk=prefill_chunk, progress=progress)
        self.runner = runner
        self.cfg = runner.cfg
        self.pg = runner.pg
        self.cache = runner.cache
        self.pool = runner.cache.pool
        self.kv = KVCacheManager(self.pool, share_prefixes=share_prefixes)  # the books
        self.stats = self.kv.stats
        self.waiting: deque[_Live] = deque()  # arrived, not admitted (preempted ones first)
        self.max_batch, self.tbt_slo_s, self.fuse = max_batch, tbt_slo_s, fuse
        self.costs = costs or StepCosts.from_hardware(
            self.cfg, runner.hardware, cp=self.pg.cp, tp=self.pg.tp
        )
        self.timer = ChunkTimer(self.costs)
        self.sched = Scheduler(cp=self.pg.cp, device=runner.device)
        self._mixed: tuple[float, float] | None = None  # the last mixed iteration's start, sizing
        self.on_step: Callable[[Step], None] | None = None  # told of every forward pass
        # a request's failure ends that request alone (serving); offline it ends the run
        self.contain = True
        # told when this rank failed out of step with the others (default: exit at once)
        self.on_failed_alone: Callable[[str], None] | None = None
        # long prompts prefilled elsewhere (disaggregated serving): see connect()
        self.remote: RemotePrefills | None = None

    def connect(self, connector: KVConnector) -> None:
        """Prefill prompts of ``connector.min_tokens`` new tokens or more through ``connector``
        (another engine prefills them; this one adopts their K/V and decodes)."""
        self.remote = RemotePrefills(self, connector)

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
        """The pool and prefix reuse now (rank 0 sends them to the API's metrics)."""
        if self.connector is not None:
            self.stats.handoff_tokens = self.connector.token_heads
        return self.kv.snapshot()

    # -- admission ----------------------------------------------------------------------------
    def _arrive(self, req: Request, done: Done | None) -> None:
        """A request joins the queue, or is refused now if the pool cannot hold it even alone
        (pure: every rank refuses alike, and a refusal ends this request alone)."""
        outcome = Outcome(
            prompt_tokens=len(req.tokens), logprobs=[] if req.wants_logprobs else None,
            top_logprobs=[] if req.top_logprobs is not None else None,
        )  # fmt: skip
        try:
            check_pool(len(req.tokens), req.sampling.max_new_tokens, n_blocks=self.pool.n_blocks,
                       block_size=self.pool.block_size, cp=self.pool.cp)  # fmt: skip
            gen = torch.Generator(device=self.runner.device).manual_seed(req.sampling.seed)
        except Exception as e:
            self._refuse(req, outcome, e, done)
            return
        self.waiting.append(_Live(req, outcome, gen, admitted=time.perf_counter()))

    def _refuse(self, req: Request, outcome: Outcome, e: BaseException, done) -> None:
        outcome.finish_reason, outcome.error = "error", error_message(e)
        logger.warning("request %d refused: %s", req.rid, outcome.error)
        if done is not None:
            done([req], {req.rid: outcome})

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
        self.cache.copy_tail(copies)
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

    # -- offline: every request up front ------------------------------------------------------
    @torch.no_grad()
    def run(
        self, requests: Sequence[Request], emit: Emit | None = None
    ) -> tuple[list[Outcome], list[Step]]:
        """Run ``requests`` to the end, admitting each as a slot frees; the same call on every
        rank (generate's and the benchmarks' door). No rank leads: the arguments are the
        orders, and no per-iteration broadcast syncs the pipeline stages.

        Args:
            emit: called on every rank with [(rid, token, logprob)] as each step's tokens are
                sampled (as :meth:`run_span`'s).

        Returns:
            the outcomes in request order, and every step that ran.

        Raises:
            RuntimeError: a request failed (sampling, say); every rank raises alike.
        """
        outcomes: dict[int, Outcome] = {}
        steps: list[Step] = []

        def done(reqs: list[Request], results: dict[int, Outcome]) -> None:
            outcomes.update(results)

        waiting = list(requests)
        on_step, self.on_step = self.on_step, steps.append
        self.contain = False
        try:
            while waiting or self.busy:
                admit, waiting = waiting[: self.room], waiting[self.room :]
                for req in admit:
                    self._arrive(req, done)
                self._iterations(self.timer.estimates, emit, done, None, sync=False)
        finally:
            self.on_step, self.contain = on_step, True
        failed = [(r.rid, outcomes[r.rid].error) for r in requests if outcomes[r.rid].error]
        if failed:
            raise RuntimeError(f"request {failed[0][0]} failed: {failed[0][1]}")
        return [outcomes[r.rid] for r in requests], steps

    # -- a span of iterations -------------------------------------------------------------------
    @torch.no_grad()
    def run_span(
        self, orders: Orders, emit: Emit | None = None, done: Done | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> None:  # fmt: skip
        """Admit ``orders``' requests, stop the cancelled ones, then run up to :data:`SPAN`
        iterations; the same call on every rank.

        Args:
            emit: called with [(rid, token, logprob)] as each step's tokens are sampled (rank 0
                streams them); logprob is (its log-probability, [(id, logprob)] of the most
                likely) for a request with ``top_logprobs``, else None.
            done: called with finished requests and their outcomes (errors are agreed by
                all ranks: see :func:`on_all_ranks`).
            interrupt: rank 0's: true when the span should end before its next iteration
                (new orders are waiting); every rank learns rank 0's answer.
        """
        for req in orders.requests:
            self._arrive(req, done)
        if self.remote is not None:
            self.remote.cancel(orders.cancelled)
            if orders.arrived:
                self.remote.adopt_arrived(orders.arrived, emit, done)
        for x in self.live.values():
            if x.request.rid in orders.cancelled and not x.state.done:
                x.state.done = True
                x.outcome.finish_reason = "cancelled"
        gone = [x for x in self.waiting if x.request.rid in orders.cancelled]
        for x in gone:
            self.waiting.remove(x)
            x.outcome.finish_reason, x.outcome.tokens = "cancelled", list(x.before)
        if done is not None and gone:
            done([x.request for x in gone], {x.request.rid: x.outcome for x in gone})
        alone = None

        def iterations() -> None:
            nonlocal alone
            try:
                self._iterations(orders.estimates, emit, done, interrupt)
            except Exception as e:  # maybe on this rank only: the others would wait forever
                logger.exception("a span of iterations failed")
                alone = threading.Timer(ALONE_AFTER_S, self._failed_alone, args=(e,))
                alone.daemon = True
                alone.start()
                raise

        try:
            on_all_ranks(iterations)
        except RankFailure as e:  # the requests in flight are in an unknown state: drop them
            failed = [*self.live.values(), *self.waiting]
            for s in self.sched.seqs:
                self.kv.release(s.seq)
            self.sched.seqs.clear()
            self.waiting.clear()
            for x in failed:
                x.outcome.finish_reason, x.outcome.error = "error", str(e)
            if done is not None and failed:
                done([x.request for x in failed], {x.request.rid: x.outcome for x in failed})
        finally:
            if alone is not None:
                alone.cancel()

    def _failed_alone(self, error: BaseException) -> None:
        """This rank's span failed and its peers did not say so: they are blocked in a step
        this rank left. Nothing can bring them back in step; stop this rank so that they see
        it gone (the server's watchdog does) instead of waiting for the process-group timeout."""
        message = (
            f"rank {dist.get_rank() if dist.is_initialized() else 0} failed alone in a step "
            f"({error_message(error)}); its peers are blocked in that step: stopping it"
        )
        logger.error("%s", message)
        announce_failure(message)
        (self.on_failed_alone or (lambda _message: exit_now(1)))(message)

    def _iterations(self, est: Estimates, emit, done, interrupt, *, sync: bool = True) -> None:
        """Up to :data:`SPAN` iterations; ``sync``: rank 0 may end the span after any of them
        (one broadcast per iteration; offline runs have no leader and skip it)."""
        self._retire(done)  # cancelled ones leave before they cost a step
        for i in range(SPAN):
            if i and sync and self._interrupted(interrupt):
                return
            self._admit_waiting(done)
            if not self.sched.seqs:
                self._mixed = None
                return
            t0 = time.perf_counter()
            if self._mixed is not None:  # how far off the last mixed iteration's sizing was,
                start, predicted = self._mixed  # start to start: what the decodes' TBT is
                self.timer.iteration(t0 - start, predicted)
            predicted = self._iteration(est, emit, done)
            self._mixed = None if predicted is None else (t0, predicted)
            self._retire(done)

    def _interrupted(self, interrupt: Callable[[], bool] | None) -> bool:
        """Whether rank 0 ends the span now, for orders that cannot wait (a client left, a
        request waits for a free slot): one small broadcast per iteration, so that a cancel
        takes effect within one iteration rather than at the end of the span."""
        flag = torch.tensor([interrupt is not None and interrupt()], dtype=torch.long,
                            device=self.runner.device)  # fmt: skip
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _iteration(self, est: Estimates, emit, done: Done | None) -> float | None:
        """One decode step of the running requests and one prefill step of waiting ones, in
        one forward pass when both run (``fuse``), each made to fit the pool first. Returns
        the predicted time of a mixed iteration whose chunk the target sized."""
        runner, sched = self.runner, self.sched
        decode = self._fit_decode(done)
        decoding = sched.decoding if decode is not None else []
        pending = [s for s in sched.seqs if s.prefilled < len(s.new) and not s.done]
        batch = None
        if pending:
            take = self._take(pending, est, decoding)
            batch = self._fit_prefill(take, decode, done)
        fused = self.fuse and decode is not None and batch is not None
        if decode is not None and not fused:
            t0 = time.perf_counter()
            out = runner.step(decode)
            self._sample(decode, out.logits, range(decode.n_seqs), emit)
            seconds = time.perf_counter() - t0
            self.timer.decode(seconds)
            self._report(Step("decode", seconds, decode_tokens=decode.n_seqs))
        if batch is None:
            return None
        live = self.live
        lives = [live[seq] for seq in batch.seqs]
        want = any(x.prompt_logprobs for x in lives)
        top = max((x.request.top_logprobs or 0 for x in lives if x.prompt_logprobs), default=0)
        t0 = time.perf_counter()
        if fused:
            out = runner.step_mixed(batch, decode, prompt_logprobs=want, prompt_top=top)
            self._sample(decode, out.decode_logits, range(decode.n_seqs), emit)
        else:
            out = runner.step(batch, prompt_logprobs=want, prompt_top=top, progress=self.progress)
        logits = out.logits
        if want:
            prompt = runner.share_object((out.prompt_logprobs, out.prompt_top_logprobs))
            for j, x in enumerate(lives):
                if x.prompt_logprobs:
                    x.outcome.logprobs += prompt[0][j]
                    if x.outcome.top_logprobs is not None:  # none computed when no row asks
                        k = x.request.top_logprobs
                        tops = prompt[1][j] if prompt[1] is not None else [[]] * len(prompt[0][j])
                        x.outcome.top_logprobs += [alts[:k] for alts in tops]
        rows = sched.prefilled(batch)
        for row in rows:  # its prompt is cached: later requests may share it
            state = lives[row].state
            self.kv.prefilled(state.seq, state.history + state.prompt)
        if logits is not None:
            for row in rows:
                if lives[row].request.first_logits:
                    lives[row].outcome.first_logits = logits[row].float().clone()
        self._sample(batch, logits, rows, emit)
        seconds = time.perf_counter() - t0
        if fused:
            self.timer.mixed(seconds, batch.n_tokens, batch.n_cached)
        else:
            self.timer.prefill(seconds, batch.n_tokens, batch.n_cached)
        self._report(Step(
            "mixed" if fused else "prefill", seconds, prefill_tokens=batch.n_tokens,
            cached_tokens=batch.n_cached, decode_tokens=decode.n_seqs if fused else 0,
            variant=batch.variant,
        ))  # fmt: skip
        if self.tbt_slo_s is None or not decoding:
            return None
        return est.iteration_s(self.costs, new=batch.n_tokens, cached=batch.n_cached,
                               **_decode_load(decoding))  # fmt: skip

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

    def _report(self, step: Step) -> None:
        if self.on_step is not None:
            self.on_step(step)

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

    def _sample(self, batch, logits, rows: Sequence[int], emit) -> None:
        """Sample each row's next token with its request's own generator (an answer does not
        depend on its batch), share it along the pipeline and record it."""
        live = self.live
        lives = [live[batch.seqs[r]] for r in rows]
        if rows:
            tokens, failed = None, {}
            want = any(x.request.wants_logprobs for x in lives)
            k = max((x.request.top_logprobs or 0 for x in lives), default=0)
            if logits is not None:
                tokens, failed = self._draw(logits, rows, lives)
            if want:
                chosen, alternatives = self.runner.share_logprobs(
                    None if logits is None else logits[list(rows)],
                    None if tokens is None else tokens.clamp(min=0), k, len(rows),
                )  # fmt: skip
            tokens = self.runner.share(tokens, (len(rows),), torch.long).tolist()
            if any(t < 0 for t in tokens):  # every stage sees it: they fetch why together
                failed = self.runner.share_object(failed)
                for j, x in enumerate(lives):
                    if tokens[j] < 0:
                        x.state.done = True
                        x.outcome.finish_reason, x.outcome.error = "error", failed[j]
        before = [len(x.state.out) for x in lives]
        self.sched.record_rows(batch, {
            x.state.seq: t for x, t in zip(lives, tokens, strict=True) if t >= 0
        } if rows else {})  # fmt: skip
        events = []
        for j, (x, n) in enumerate(zip(lives, before, strict=True)):
            if len(x.state.out) > n:
                if x.outcome.ttft_s is None:
                    x.outcome.ttft_s = time.perf_counter() - x.admitted
                if x.request.wants_logprobs:
                    x.outcome.logprobs.append(chosen[j])
                logprob = None
                if x.outcome.top_logprobs is not None:
                    alts = alternatives[j][: x.request.top_logprobs]
                    x.outcome.top_logprobs.append(alts)
                    logprob = (chosen[j], alts)
                events.append((x.request.rid, x.state.out[-1], logprob))
        if emit is not None and events:
            emit(events)  # one message for the step's tokens, not one per token

    def _draw(self, logits, rows: Sequence[int], lives: list[_Live]) -> tuple[torch.Tensor, dict]:
        """Each row's token by its request's sampling, all rows in one pass. If that fails,
        row by row: a row whose sampling fails gets -1 and its message (that request fails
        alone). Offline (:meth:`run`) a failure is the run's: it propagates."""
        args = ([x.request.sampling for x in lives], [x.generator for x in lives],
                [len(x.before) + len(x.state.out) for x in lives])  # fmt: skip
        states = [g.get_state() for g in args[1]]
        try:
            return sample_rows(logits[list(rows)], *args), {}
        except Exception:
            if not self.contain:
                raise
            for g, state in zip(args[1], states, strict=True):  # as if nothing was drawn
                g.set_state(state)
        tokens, failed = [], {}
        for j, (r, x) in enumerate(zip(rows, lives, strict=True)):
            try:
                t = sample_rows(logits[r : r + 1], [args[0][j]], [args[1][j]], [args[2][j]])
            except Exception as e:
                logger.warning("request %d: sampling failed: %s", x.request.rid, e)
                failed[j] = f"sampling failed: {error_message(e)}"
                t = torch.full((1,), -1, dtype=torch.long, device=logits.device)
            tokens.append(t)
        return torch.cat(tokens), failed

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
        if done is not None and finished:
            done([x.request for x in finished], {x.request.rid: x.outcome for x in finished})


def _decode_load(decoding: Sequence[SequenceState]) -> dict[str, int]:
    """The running decodes, as the chunk sizing weighs them."""
    return {
        "decode_batch": len(decoding),
        "decode_context": sum(len(s.history) + len(s.prompt) + len(s.out) for s in decoding),
    }
