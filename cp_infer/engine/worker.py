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
from cp_infer.engine.kv_tier import TierIO
from cp_infer.engine.params import SamplingConfig
from cp_infer.engine.plan import Draws, StepPlan
from cp_infer.engine.remote import handoff_plans, store_handoff
from cp_infer.engine.request import Emit
from cp_infer.engine.runner import ModelRunner
from cp_infer.engine.sampling import GREEDY_BELOW, sample_rows

__all__ = ["Drawn", "PlanResult", "Worker"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A float8 tensor's bytes (copied and sent as uint8); any other tensor as it is."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


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
        placed: per :class:`~cp_infer.engine.plan.PlacedPass` of the plan, its decode's and
            prefill's draws and prompt log-probabilities (gathered from the rank that ran it).
        placed_s: wall time of the placed passes here, their exchange of tokens included.
    """

    decode: Drawn | None = None
    prefill: Drawn | None = None
    prompt: tuple | None = None
    decode_s: float = 0.0
    prefill_s: float = 0.0
    placed: list[tuple[Drawn | None, Drawn | None, tuple | None]] = field(default_factory=list)
    placed_s: float = 0.0


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
        self.tier: TierIO | None = None  # this rank's KV tier files, and the engine's group
        self.group = None
        self.tier_agreed: dict[int, str | None] = {}  # ticket -> why a rank could not read
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
        if plan.placed:  # the ring's rows and this rank's placed ones: one pass
            assert after_layer is None, "a prefill tier places nothing (ring_min_tokens=0)"
            t0 = time.perf_counter()
            result.placed = self._run_placed(plan, emit, result)
            result.placed_s = time.perf_counter() - t0
            return result
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
            self._keep_first_logits(plan.prefill_draws, out.logits)
            result.prefill = self._draw(plan.prefill_draws, out.logits, plan.contain, emit)
            result.prefill_s = time.perf_counter() - t0
        return result

    def _keep_first_logits(self, draws: Draws | None, logits, into: dict | None = None) -> None:
        """The logits of the rows whose request asked for its first token's (the last stage)."""
        if draws is not None and logits is not None:
            for row, rid in zip(draws.rows, draws.rids, strict=True):
                if rid in draws.keep_logits:
                    (self.first_logits if into is None else into)[rid] = logits[row].float().clone()

    # -- rows placed on single ranks ------------------------------------------------------------
    def _run_placed(self, plan: StepPlan, emit: Emit | None, result: PlanResult) -> list:
        """A plan with rows placed on single ranks: this rank runs the ring's rows and its own
        placed rows as one forward pass (:meth:`ModelRunner.step_many`: the weights are read
        once), then keeps the books of the other ranks' placed rows (every ledger gets the
        ring's tokens first, then its own rank's, on every rank alike). One exchange over the
        CP group brings every placed row's token to every rank. Returns each placed pass's
        (decode draws, prefill draws, prompt log-probabilities)."""
        runner, me = self.runner, self.runner.pg.cp_rank
        assert plan.fused or plan.decode is None or plan.prefill is None, "placed rows fuse"
        mine = next((p for p in plan.placed if p.rank == me), None)
        batches, prompt = [], {}
        for batch, asks, top in (
            (plan.prefill, plan.prompt_logprobs, plan.prompt_top), (plan.decode, False, 0),
            *(((mine.prefill, mine.prompt_logprobs, mine.prompt_top), (mine.decode, False, 0))
              if mine is not None else ()),
        ):  # fmt: skip
            if batch is not None:
                if asks:
                    prompt[len(batches)] = top
                batches.append(batch)
        outs = runner.step_many(batches, prompt=prompt) if batches else []
        out = {id(b): o for b, o in zip(batches, outs, strict=True)}  # batch -> its output
        for p in plan.placed:
            if p.rank != me:
                runner.keep_books(p.prefill, p.decode)

        def drawn(draws, batch, asks: bool, emits: Emit | None, kept: dict | None = None):
            """A pass's draws, and its prompt log-probabilities when asked (None, None)."""
            if batch is None:
                return None, None
            o = out[id(batch)]
            prompt_lp = None
            if asks:
                prompt_lp = runner.share_object((o.prompt_logprobs, o.prompt_top_logprobs))
            if batch.kind == "prefill":
                self._keep_first_logits(draws, o.logits, kept)
            return self._draw(draws, o.logits, plan.contain, emits), prompt_lp

        result.decode, _ = drawn(plan.decode_draws, plan.decode, False, emit)
        result.prefill, result.prompt = drawn(plan.prefill_draws, plan.prefill,
                                              plan.prompt_logprobs, emit)  # fmt: skip
        placed: list[tuple[Drawn | None, Drawn | None, tuple | None]] = []
        kept: dict[int, torch.Tensor] = {}
        for p in plan.placed:
            if p.rank != me:
                placed.append((None, None, None))
                continue
            decode, _ = drawn(p.decode_draws, p.decode, False, None)
            prefill, prompt_lp = drawn(p.prefill_draws, p.prefill, p.prompt_logprobs, None, kept)
            placed.append((decode, prefill, prompt_lp))
        results = self._share_placed(plan, placed, kept)
        for p, pair in zip(plan.placed, results, strict=True):
            if p.rank != me:  # spend the draws the rank that ran them spent: every rank's
                for draws, drawn in zip((p.decode_draws, p.prefill_draws), pair[:2],
                                        strict=True):  # generators stay alike  # fmt: skip
                    if drawn is not None:
                        self._skip_draws(draws, drawn)
        if emit is not None:
            for p, (decode, prefill, _) in zip(plan.placed, results, strict=True):
                for draws, drawn in ((p.decode_draws, decode), (p.prefill_draws, prefill)):
                    if drawn is not None:
                        self._emit(draws, drawn, emit)
        return results

    def _skip_draws(self, draws: Draws, drawn: Drawn) -> None:
        """Advance each row's generator by the draw sampling it took on the rank that ran it
        (one uniform per sampled row; a greedy row draws none), so that a request drawn on
        any rank later (on the ring, after a preemption) draws as if it had always been."""
        for rid, token in zip(draws.rids, drawn.tokens, strict=True):
            if token >= 0 and self.samplings[rid].temperature >= GREEDY_BELOW:
                gen = self.generators[rid]
                torch.rand((), generator=gen, device=gen.device)

    def _share_placed(self, plan: StepPlan, mine: list[tuple], kept: dict) -> list[tuple]:
        """Every placed pass's draws on every rank: one exchange of a float64 table (a row per
        drawn row: token, its log-probability, the alternatives' ids and log-probabilities),
        and only when needed (a failed row, prompt log-probabilities, kept logits) one of
        objects."""
        runner = self.runner  # (placement needs CP > 1)
        top = max((d.top for p in plan.placed for d in (p.decode_draws, p.prefill_draws)
                   if d is not None), default=0)  # fmt: skip
        slots = [d for p in plan.placed for d in (p.decode_draws, p.prefill_draws)]
        n = sum(len(d.rows) for d in slots if d is not None)
        table = torch.zeros(n, 2 + 2 * top, dtype=torch.float64)
        at, where = 0, []
        for p, drawn_pair in zip(plan.placed, mine, strict=True):
            for d, drawn in zip((p.decode_draws, p.prefill_draws), drawn_pair[:2], strict=True):
                if d is None:
                    where.append(None)
                    continue
                where.append((at, len(d.rows), p.rank))
                if drawn is not None:
                    rows = table[at : at + len(d.rows)]
                    rows[:, 0] = torch.tensor(drawn.tokens, dtype=torch.float64)
                    if drawn.chosen is not None:
                        rows[:, 1] = torch.tensor(drawn.chosen, dtype=torch.float64)
                        for j, alts in enumerate(drawn.alternatives):
                            for i, (tid, lp) in enumerate(alts[:top]):
                                rows[j, 2 + i], rows[j, 2 + top + i] = tid, lp
                at += len(d.rows)
        exchange = runner._decode_exchange(max(table.numel() * 8, 8))
        parts = exchange.all_gather(table.to(runner.device))
        rare = any(p.prompt_logprobs for p in plan.placed) or any(
            d.keep_logits for d in slots if d is not None
        )
        failed_any = any(bool((part[:, 0] < 0).any()) for part in parts)
        objects = None
        if rare or failed_any:  # (every rank computes the same test from the same table)
            objects = [None] * runner.pg.cp
            mine_objects = ([(x[0].failed if x[0] else None, x[1].failed if x[1] else None, x[2])
                             for x in mine], kept)  # fmt: skip
            torch.distributed.all_gather_object(objects, mine_objects, group=runner.pg.cp_group)
            for _, theirs in objects:
                self.first_logits.update(theirs)
        results, k = [], 0
        for i, p in enumerate(plan.placed):
            pair = []
            for j, d in enumerate((p.decode_draws, p.prefill_draws)):
                spot = where[k]
                k += 1
                if spot is None:
                    pair.append(None)
                    continue
                a, m, rank = spot
                rows = parts[rank][a : a + m].cpu()
                tokens = [int(t) for t in rows[:, 0].tolist()]
                failed = {} if objects is None else (objects[rank][0][i][j] or {})
                chosen = alternatives = None
                if d.logprobs:
                    chosen = rows[:, 1].tolist()
                    alternatives = [
                        [(int(t), lp) for t, lp in zip(r[2 : 2 + d.top].tolist(),
                                                       r[2 + top : 2 + top + d.top].tolist(),
                                                       strict=True)]
                        for r in rows
                    ]  # fmt: skip
                pair.append(Drawn(tokens, failed, chosen, alternatives))
            prompt = None if objects is None else objects[p.rank][0][i][2]
            results.append((*pair, prompt))
        return results

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
            elif kind == "reshard":  # a chat moving onto the ring: its K/V spread over CP
                _, src, dst, n, rank = op
                if not self.leader:  # (the leader's books have it already)
                    self.pool.spread(dst, n)
                self._reshard(src, dst, n, rank)
            elif kind == "draw":  # draws spent elsewhere: a prefill tier's, an earlier run's
                gen = self.generators[op[1]]
                for _ in range(op[2]):  # one uniform per token, as sampling draws them
                    torch.rand((), generator=gen, device=gen.device)
            elif kind == "forget":
                self.samplings.pop(op[1], None)
                self.generators.pop(op[1], None)
            elif kind.startswith("tier_") or kind == "spill":
                self._tier(op)
            elif not self.leader:  # the hand-off's, on a follower
                self._handoff(op)

    def _reshard(self, src: int, dst: int, n: int, rank: int) -> None:
        """Copy the first ``n`` tokens of ``src``, all on CP rank ``rank``, into ``dst``'s
        slots on every CP rank (its books say which positions each keeps): ``rank`` sends each
        peer its positions' K/V (FP8 with their scales), every layer of this stage at once,
        and copies its own."""
        cache, pg = self.cache, self.runner.pg
        # (float8 is copied and sent as its bytes)
        tensors = [_bytes(t) for t in (cache.k, cache.v, cache.k_scale, cache.v_scale)
                   if t is not None]  # fmt: skip

        def slots(seq: int, ledger) -> tuple[list[int], list[int]]:
            where = [s for first, m in ledger.runs(seq) for s in range(first, first + m)]
            return ledger.positions_of(seq), where

        if pg.cp_rank == rank:
            positions, where = slots(src, cache.ledger)
            at = dict(zip(positions, where, strict=True))
            sends = []
            for r, ledger in enumerate(self.pool.ledgers):
                wanted = ledger.positions_of(dst)
                if not wanted:
                    continue
                index = torch.tensor([at[p] for p in wanted], dtype=torch.long,
                                     device=cache.device)  # fmt: skip
                parts = [t.index_select(2, index) for t in tensors]
                if r == rank:
                    _, mine = slots(dst, ledger)
                    to = torch.tensor(mine, dtype=torch.long, device=cache.device)
                    for t, part in zip(tensors, parts, strict=True):
                        t.index_copy_(2, to, part)
                    continue
                for part in parts:
                    sends.append(torch.distributed.isend(part, pg.cp_ranks[r],
                                                         group=pg.cp_group))  # fmt: skip
            for w in sends:
                w.wait()
            return
        positions, mine = slots(dst, cache.ledger)
        if not positions:
            return
        to = torch.tensor(mine, dtype=torch.long, device=cache.device)
        for t in tensors:
            part = torch.empty((*t.shape[:2], len(mine), *t.shape[3:]), dtype=t.dtype,
                               device=t.device)  # fmt: skip
            torch.distributed.recv(part, pg.cp_ranks[rank], group=pg.cp_group)
            t.index_copy_(2, to, part)

    def _tier(self, op: tuple) -> None:
        """A KV tier's op (:mod:`cp_infer.engine.tiering`): the leader spilled and adopts at
        decision time; every rank reads and agrees."""
        kind, tier = op[0], self.tier
        if kind == "spill":  # before the free that follows it
            if not self.leader:
                tier.capture(op[1], op[2])
        elif kind == "tier_fetch":
            tier.fetch(*op[1:])
        elif kind == "tier_check":
            self.tier_agreed[op[1]] = tier.agree(op[1], self.group)
        elif kind == "tier_adopt":
            if not self.leader:
                _, ticket, seq, skip, length = op
                self._store(seq, skip, length, tier.take(ticket)[0])
        elif kind == "tier_drop":
            if not self.leader:
                tier.take(op[1])
        else:
            raise ValueError(f"unknown KV op {kind!r}")

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
            self._store(seq, skip, length, staged)
        else:
            raise ValueError(f"unknown KV op {kind!r}")

    def _store(self, seq: int, skip: int, length: int, staged) -> None:
        """Store staged K/V (a prefill tier's hand-off, a KV tier's read) as this rank's
        positions ``[skip, length)`` of ``seq``, as the leader's adoption planned them."""
        plans = handoff_plans(seq, skip, length, self.pool.cp)
        store_handoff(self.cache, plans, lambda: staged.store(self.cache))

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
            self._emit(draws, drawn, emit)
        return drawn

    @staticmethod
    def _emit(draws: Draws, drawn: Drawn, emit: Emit) -> None:
        events = []
        for j, (rid, t, k) in enumerate(zip(draws.rids, drawn.tokens, draws.tops, strict=True)):
            if t >= 0:
                logprob = None if k is None else (drawn.chosen[j], drawn.alternatives[j][:k])
                events.append((rid, t, logprob))
        if events:
            emit(events)  # one message for the pass's tokens, not one per token

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
