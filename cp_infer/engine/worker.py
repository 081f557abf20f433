"""The worker: executes the leader's step plans on this rank (every rank of the engine group).

It holds no scheduler and decides nothing. For each :class:`~cp_infer.engine.plan.StepPlan` it

1. replays the plan's changes to the KV cache's books on this rank's ledgers (the leader's own
   ledgers made them already) and copies the tails of forked blocks;
2. runs the plan's forward passes through the :class:`~cp_infer.engine.runner.ModelRunner`;
3. draws each row's next token with its request's own generator (the last pipeline stage),
   shares the tokens (and any log-probabilities) along the pipeline, and reports them.

Every rank draws alike, so sampling is the same whichever rank leads and whichever door a
request came in by. What it returns (:class:`Drawn`) is what the leader records.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cp_infer.distributed import error_message
from cp_infer.engine.batch import StepBatch
from cp_infer.engine.connector import KVConnector
from cp_infer.engine.params import SamplingConfig
from cp_infer.engine.plan import Draws, StepPlan
from cp_infer.engine.remote import handoff_plans, store_handoff
from cp_infer.engine.request import Emit
from cp_infer.engine.runner import ModelRunner
from cp_infer.engine.sampling import sample_rows

__all__ = ["Drawn", "PlanResult", "Worker"]

logger = logging.getLogger(__name__)


@dataclass
class Drawn:
    """The tokens one pass drew, on every rank: per row of its :class:`Draws`.

    Attributes:
        tokens: each row's token; -1 where its sampling failed.
        failed: row index -> why its sampling failed.
        chosen: each row's token's log-probability (when shared).
        alternatives: each row's most likely (id, log-probability) (when shared).
    """

    tokens: list[int]
    failed: dict[int, str] = field(default_factory=dict)
    chosen: list[float] | None = None
    alternatives: list[list[tuple[int, float]]] | None = None


@dataclass
class PlanResult:
    """What a plan's passes produced (the leader records it).

    Attributes:
        decode, prefill: each pass's draws (None: it drew none).
        prompt: with ``prompt_logprobs``, the prefill's (logprobs, top alternatives) per row.
        decode_s, prefill_s: wall time of each pass with its draws (a fused pass: all of it in
            ``prefill_s``).
    """

    decode: Drawn | None = None
    prefill: Drawn | None = None
    prompt: tuple | None = None
    decode_s: float = 0.0
    prefill_s: float = 0.0


class Worker:
    """Executes step plans on this rank (see the module docstring).

    Args:
        runner: this rank's model runner (its KV cache and pool).
        leader: this rank leads: its ledgers already hold the plan's changes.
    """

    def __init__(self, runner: ModelRunner, *, leader: bool) -> None:
        self.runner, self.cache, self.pool = runner, runner.cache, runner.cache.pool
        self.leader = leader
        self.samplings: dict[int, SamplingConfig] = {}
        self.generators: dict[int, torch.Generator] = {}
        self.first_logits: dict[int, torch.Tensor] = {}  # rid -> (V,) (the last stage)
        self.connector: KVConnector | None = None  # a follower's, disaggregated
        # host seconds per part of the plans run here: replaying the books' changes, the
        # forward passes, drawing and sharing the tokens (tools/bench_step.py)
        self.host_s: Counter[str] = Counter()

    # -- the plan -----------------------------------------------------------------------------
    @torch.no_grad()
    def execute(
        self, plan: StepPlan, emit: Emit | None = None, *,
        after_layer: Callable[[StepBatch, int], None] | None = None,
    ) -> PlanResult:  # fmt: skip
        """Run ``plan`` on this rank; ``emit`` gets [(rid, token, logprob)] per pass, as the
        leader's does; a prefill pass calls ``after_layer(batch, layer)`` after each layer."""
        t0 = time.perf_counter()
        for rid, sampling in plan.sampling:
            self.samplings[rid] = sampling
            self.generators[rid] = torch.Generator(device=self.runner.device).manual_seed(
                sampling.seed
            )
        self.apply(plan.ops)
        self.host_s["apply"] += time.perf_counter() - t0
        result = PlanResult()
        runner = self.runner
        if plan.decode is not None and not plan.fused:
            t0 = time.perf_counter()
            out = runner.step(plan.decode)
            self.host_s["passes"] += time.perf_counter() - t0
            result.decode = self._draw(plan.decode_draws, out.logits, plan.contain, emit)
            result.decode_s = time.perf_counter() - t0
        if plan.prefill is not None:
            t0 = time.perf_counter()
            kw = {"prompt_logprobs": plan.prompt_logprobs, "prompt_top": plan.prompt_top}
            if plan.fused:
                out = runner.step_mixed(plan.prefill, plan.decode, **kw)
                self.host_s["passes"] += time.perf_counter() - t0
                result.decode = self._draw(plan.decode_draws, out.decode_logits, plan.contain,
                                           emit)  # fmt: skip
            else:
                # one progress bar, the leader's (each rank drew its own, interleaved)
                out = runner.step(plan.prefill, progress=plan.progress and self.leader,
                                  after_layer=after_layer, **kw)  # fmt: skip
                self.host_s["passes"] += time.perf_counter() - t0
            if plan.prompt_logprobs:
                result.prompt = runner.share_object((out.prompt_logprobs, out.prompt_top_logprobs))
            draws = plan.prefill_draws
            if draws is not None and out.logits is not None:
                for row, rid in zip(draws.rows, draws.rids, strict=True):
                    if rid in draws.keep_logits:
                        self.first_logits[rid] = out.logits[row].float().clone()
            result.prefill = self._draw(draws, out.logits, plan.contain, emit)
            result.prefill_s = time.perf_counter() - t0
        return result

    def apply(self, ops: Sequence[tuple]) -> None:
        """Replay the leader's changes to the books and copy forked tails (followers: the
        leader made them already), and spend or drop generators (every rank)."""
        for op in ops:
            kind = op[0]
            if kind == "free":
                if not self.leader:
                    self.pool.free(op[1])
            elif kind == "fork":  # (the leader copied its tail when it forked)
                _, src, dst, position, copies = op
                if not self.leader:
                    mine = self.pool.fork(src, dst, position)
                    assert mine == copies, f"fork {src}->{dst}: {mine} != the leader's {copies}"
                    self.cache.copy_tail(copies)
            elif kind == "draw":  # the prefill tier drew this request's first token
                gen = self.generators[op[1]]
                torch.rand((), generator=gen, device=gen.device)
            elif kind == "forget":
                self.samplings.pop(op[1], None)
                self.generators.pop(op[1], None)
            elif not self.leader:  # the hand-off's, on a follower
                self._handoff(op)

    def _handoff(self, op: tuple) -> None:
        kind = op[0]
        if kind == "remote":  # post this rank's receives for the job, in the leader's order
            self.connector.submit(op[1])
        elif kind == "drop":
            self.connector.take(op[1])
        elif kind == "adopt":
            _, rid, seq, skip, length = op
            _, staged, error = self.connector.take(rid)
            if error is not None:
                raise RuntimeError(f"the hand-off of request {rid} failed here alone: {error}")
            plans = handoff_plans(seq, skip, length, self.pool.cp)
            store_handoff(self.cache, plans, lambda: staged.store(self.cache))
        else:
            raise ValueError(f"unknown KV op {kind!r}")

    # -- sampling -----------------------------------------------------------------------------
    def _draw(
        self, draws: Draws | None, logits: torch.Tensor | None, contain: bool, emit: Emit | None
    ) -> Drawn | None:  # fmt: skip
        """Each row's token with its request's generator (the last stage), shared along the
        pipeline with the log-probabilities asked for; ``emit`` gets them."""
        if draws is None:
            return None
        t0 = time.perf_counter()
        try:
            return self._draw_rows(draws, logits, contain, emit)
        finally:
            self.host_s["draw"] += time.perf_counter() - t0

    def _draw_rows(self, draws: Draws, logits, contain: bool, emit: Emit | None) -> Drawn:
        runner, rows, n = self.runner, list(draws.rows), len(draws.rows)
        tokens, failed = None, {}
        if logits is not None:
            tokens, failed = self._sample(logits, draws, contain)
        chosen = alternatives = None
        if draws.logprobs:
            chosen, alternatives = runner.share_logprobs(
                None if logits is None else logits[rows],
                None if tokens is None else tokens.clamp(min=0), draws.top, n,
            )  # fmt: skip
        tokens = runner.share(tokens, (n,), torch.long).tolist()
        if any(t < 0 for t in tokens):  # every stage sees it: they fetch why together
            failed = runner.share_object(failed)
        drawn = Drawn(tokens, failed, chosen, alternatives)
        if emit is not None:
            events = []
            for j, (rid, t, k) in enumerate(zip(draws.rids, tokens, draws.tops, strict=True)):
                if t >= 0:
                    logprob = None if k is None else (chosen[j], alternatives[j][:k])
                    events.append((rid, t, logprob))
            if events:
                emit(events)  # one message for the pass's tokens, not one per token
        return drawn

    def _sample(self, logits, draws: Draws, contain: bool) -> tuple[torch.Tensor, dict]:
        """All rows in one pass; if that fails, row by row: a row whose sampling fails gets -1
        and its message (that request fails alone). Uncontained (offline), a failure is the
        run's: it propagates."""
        rows = list(draws.rows)
        configs = [self.samplings[rid] for rid in draws.rids]
        gens = [self.generators[rid] for rid in draws.rids]
        states = [g.get_state() for g in gens]
        try:
            return sample_rows(logits[rows], configs, gens, list(draws.generated)), {}
        except Exception:
            if not contain:
                raise
            for g, state in zip(gens, states, strict=True):  # as if nothing was drawn
                g.set_state(state)
        tokens, failed = [], {}
        for j, r in enumerate(rows):
            try:
                t = sample_rows(logits[r : r + 1], [configs[j]], [gens[j]], [draws.generated[j]])
            except Exception as e:
                logger.warning("request %d: sampling failed: %s", draws.rids[j], e)
                failed[j] = f"sampling failed: {error_message(e)}"
                t = torch.full((1,), -1, dtype=torch.long, device=logits.device)
            tokens.append(t)
        return torch.cat(tokens), failed
