"""One iteration, for the leader: decide the passes, send them as a plan, record the tokens.

Each iteration is one decode step of the running requests and one prefill step of the waiting
ones (fused into one pass when both run), each first made to fit the KV pool (evicting
retained sequences, else preempting the latest request), the prefill chunk sized by the TBT
target. The plan goes to every rank (:meth:`EngineCore._execute
<cp_infer.engine.core.EngineCore._execute>`); the tokens the workers drew come back into the
scheduler and the requests' outcomes. A mixin of :class:`~cp_infer.engine.core.EngineCore`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cp_infer.engine.batch import StepBatch
from cp_infer.engine.chunking import Estimates, choose_chunk
from cp_infer.engine.plan import Draws, PlacedPass
from cp_infer.engine.request import Done, Step
from cp_infer.engine.scheduler import SequenceState
from cp_infer.engine.worker import Drawn

if TYPE_CHECKING:
    from cp_infer.engine.admission import _Live

__all__ = ["Iterations"]


class Iterations:
    """The leader's iteration (a mixin of ``EngineCore``)."""

    # -- one iteration ------------------------------------------------------------------------
    def _iteration(self, emit, done: Done | None, on_step, after_layer) -> float | None:
        """One decode step of the running requests and one prefill step of waiting ones, in
        one forward pass when both run (``fuse``), each made to fit the pool first: decided
        here, sent as one plan, executed on every rank, then recorded. The ring's rows run as
        the ring's passes; the rows placed on single ranks as each rank's own pass
        (:class:`~cp_infer.engine.plan.PlacedPass`). Returns the predicted time of a mixed
        iteration whose chunk the target sized."""
        t0 = time.perf_counter()
        sched, est = self.sched, self.timer.estimates
        decodes = self._fit_decode(done)
        decoding = sched.decoding if decodes else []
        pending = [s for s in sched.seqs if s.prefilled < len(s.new) and not s.done]
        prefills: dict[int | None, StepBatch] = {}
        if pending:
            prefills = self._fit_prefill(self._take(pending, est, decoding), decodes, done)
        if not decodes and not prefills:
            return None
        decode, batch = decodes.get(None), prefills.get(None)
        # rows placed on single ranks run in one pass with the ring's (each rank reads its
        # weights once per iteration)
        placing = any(where is not None for where in (*decodes, *prefills))
        fused = (self.fuse or placing) and decode is not None and batch is not None
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
            passes["prefill"] = batch
            passes["prefill_draws"] = self._draws([lives[r] for r in rows], rows) if rows else None
            passes["prompt_logprobs"], passes["prompt_top"] = _prompt_asks(lives)
        placed, placed_rows = [], []
        for rank in sorted({*decodes, *prefills} - {None}):
            p_decode, p_prefill = decodes.get(rank), prefills.get(rank)
            kw: dict = {"rank": rank}
            if p_decode is not None:
                kw["decode"] = p_decode
                kw["decode_draws"] = self._draws([live[seq] for seq in p_decode.seqs],
                                                 range(p_decode.n_seqs))  # fmt: skip
            p_rows: list[int] = []
            if p_prefill is not None:
                p_lives = [live[seq] for seq in p_prefill.seqs]
                p_rows = sched.prefilled(p_prefill)
                kw["prefill"] = p_prefill
                kw["prefill_draws"] = (self._draws([p_lives[r] for r in p_rows], p_rows)
                                       if p_rows else None)  # fmt: skip
                kw["prompt_logprobs"], kw["prompt_top"] = _prompt_asks(p_lives)
            placed.append(PlacedPass(**kw))
            placed_rows.append(p_rows)
        passes["placed"] = tuple(placed)
        plan = self._plan(**passes)
        self.iterations += 1
        t1 = time.perf_counter()
        result = self._execute(plan, emit, after_layer)
        t2 = time.perf_counter()
        self.host_s["decide"] += t1 - t0
        self.host_s["execute"] += t2 - t1
        for p, p_rows, (p_decode, p_prefill, p_prompt) in zip(
            placed, placed_rows, result.placed, strict=True
        ):
            if p.decode is not None:
                self._record(p.decode, range(p.decode.n_seqs), p_decode)
            if p.prefill is not None:
                self._record_prefill(p.prefill, p_rows, p_prefill, p_prompt)
        if decode is not None:
            self._record(decode, range(decode.n_seqs), result.decode)
        if batch is not None:
            self._record_prefill(batch, rows, result.prefill, result.prompt)
        if placed:  # one pass ran the ring's rows and each rank's own: not the ring's costs
            if on_step is not None:
                ran = [b for p in (plan, *placed) for b in (p.prefill, p.decode) if b is not None]
                on_step(Step(
                    "placed", result.placed_s,
                    prefill_tokens=sum(b.n_tokens for b in ran if b.kind == "prefill"),
                    cached_tokens=sum(b.n_cached for b in ran if b.kind == "prefill"),
                    decode_tokens=sum(b.n_seqs for b in ran if b.kind == "decode"),
                    variant=None if batch is None else batch.variant,
                ))  # fmt: skip
            # the chunk sizing learns from the one pass as from a ring's (a decode step: only
            # when nothing prefilled in it)
            decoded = any(p.decode is not None for p in (plan, *placed))
            if batch is not None:
                timed = self.timer.mixed if decoded else self.timer.prefill
                timed(result.placed_s, batch.n_tokens, batch.n_cached)
            elif not any(p.prefill is not None for p in placed):
                self.timer.decode(result.placed_s)
            self.host_s["record"] += time.perf_counter() - t2
            if self.tbt_slo_s is None or not decoding or batch is None:
                return None
            return est.iteration_s(self.costs, new=batch.n_tokens, cached=batch.n_cached,
                                   **_decode_load(decoding))  # fmt: skip
        if decode is not None and not fused:
            self.timer.decode(result.decode_s)
            if on_step is not None:
                on_step(Step("decode", result.decode_s, decode_tokens=decode.n_seqs))
        if batch is None:
            self.host_s["record"] += time.perf_counter() - t2
            return None
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

    def _record_prefill(self, batch: StepBatch, rows: Sequence[int], drawn, prompt) -> None:
        """A prefill pass's prompt log-probabilities and first tokens into the outcomes; the
        prompts it finished become shareable."""
        live = self.live
        lives = [live[seq] for seq in batch.seqs]
        if prompt is not None:
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
            self._record(batch, rows, drawn)

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

    def _fit_decode(self, done: Done | None) -> dict[int | None, StepBatch]:
        """The decode steps of the running requests, by placement (None: the ring's), once
        every rank's pool has room for their tokens (retained sequences evicted, else the
        latest requests preempted); empty if none decodes."""
        while self.sched.decoding:
            batches = {}
            for where in self.sched.placements():
                batch = self.sched.decode_batch(where)
                if batch is not None:
                    batches[where] = batch
            if self.kv.reclaim(self.kv.needs(*batches.values())):
                return batches
            self._preempt(done)
        return {}

    def _fit_prefill(
        self, take: dict[int, int], decodes: dict, done: Done | None
    ) -> dict[int | None, StepBatch]:
        """The prefill steps of ``take``, by placement, trimmed to what the pools hold beside
        the ``decodes`` (one pass or two, the iteration stores both). While requests decode,
        the prompts that do not fit wait for them; when none decode, the latest requests are
        preempted. Empty: no prefill this iteration."""
        take = dict(take)
        extra = list(decodes.values())
        while take:
            batches = {}
            for where in self.sched.placements():
                batch = self.sched.prefill_batch(
                    lambda new, cached: self.runner.resolve_variant(self.variant, new, cached),
                    take=take, rank=where,
                )  # fmt: skip
                if batch is not None:
                    batches[where] = batch
            if self.kv.reclaim(self.kv.needs(*batches.values(), *extra)):
                return batches
            if decodes:
                take.popitem()  # the latest prompt waits
                continue
            if not self._preempt(done):
                return {}
            running = {s.seq for s in self.sched.seqs}
            take = {seq: n for seq, n in take.items() if seq in running}
        return {}

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


def _prompt_asks(lives: Sequence[_Live]) -> tuple[bool, int]:
    """Whether a prefill returns prompt log-probabilities, and how many alternatives."""
    asking = [x for x in lives if x.prompt_logprobs]
    return bool(asking), max((x.request.top_logprobs or 0 for x in asking), default=0)


def _decode_load(decoding: Sequence[SequenceState]) -> dict[str, int]:
    """The running decodes, as the chunk sizing weighs them."""
    return {
        "decode_batch": len(decoding),
        "decode_context": sum(len(s.history) + len(s.prompt) + len(s.out) for s in decoding),
    }
