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

from cp_infer.engine.chunking import Estimates, choose_chunk
from cp_infer.engine.plan import Draws
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


def _decode_load(decoding: Sequence[SequenceState]) -> dict[str, int]:
    """The running decodes, as the chunk sizing weighs them."""
    return {
        "decode_batch": len(decoding),
        "decode_context": sum(len(s.history) + len(s.prompt) + len(s.out) for s in decoding),
    }
