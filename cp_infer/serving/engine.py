"""The serving engine: batches of independent requests, run together by every rank, with
automatic reuse of the KV cache that earlier requests left on the CP ranks.

Rank 0 decides what runs (:class:`ServeLoop`); every rank runs the same
:meth:`ServeEngine.run` on the same batch, so the bookkeeping (which sequences the cache keeps,
which prefix a request reuses) is identical everywhere without being sent around.

Prefix reuse. A finished request leaves its sequence in the cache (a *retained* sequence),
least recently used first out once the retained tokens pass ``max_cache_tokens``. A new request
takes the retained sequence that shares the longest prefix with its tokens, at token
granularity: the cache is cut at the first differing token (``KVCache.truncate``), and only the
rest is prefilled, over the kept prefix (persistent-KV prefill, variant by Alg. 1). A request
whose tokens are all cached recomputes its last one, which yields the first logits.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cp_infer.distributed import RankFailure, on_all_ranks
from cp_infer.engine.runner import ModelRunner
from cp_infer.engine.sampling import SamplingConfig, sample
from cp_infer.engine.scheduler import Scheduler, SequenceState

__all__ = ["Outcome", "PrefixCache", "Request", "ServeEngine", "ServeLoop"]

logger = logging.getLogger(__name__)

CANCEL_EVERY = 4  # decode steps between checks for requests whose client went away


@dataclass(frozen=True)
class Request:
    """One sequence to generate for (picklable: rank 0 sends it to every rank).

    Attributes:
        rid: the request's number (unique while the server runs).
        tokens: the whole prompt (a chat's full history: the engine finds what is cached).
        sampling: budget, temperature, top-k/p, seed and EOS ids.
        logprobs: also return every token's log-probability (prompt and generated). Such a
            request prefills its whole prompt: cached tokens have no logits to give.
    """

    rid: int
    tokens: tuple[int, ...]
    sampling: SamplingConfig
    logprobs: bool = False


@dataclass
class Outcome:
    """What a request got."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS), "length" (budget), "cancelled", "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    logprobs: list[float] | None = None  # of tokens[1:] + generated, when asked for


class PrefixCache:
    """Retained sequences, least recently used first, bounded by the tokens they keep cached."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, SequenceState] = OrderedDict()

    @property
    def tokens(self) -> int:
        return sum(s.cached for s in self.entries.values())

    def match(self, tokens: Sequence[int]) -> tuple[int | None, int]:
        """The retained sequence sharing the longest prefix with ``tokens``, and its length."""
        best, best_len = None, 0
        for seq, state in self.entries.items():
            n = _common_prefix(state.history, tokens, state.cached)
            if n > best_len:
                best, best_len = seq, n
        return best, best_len

    def take(self, seq: int) -> SequenceState:
        return self.entries.pop(seq)

    def put(self, state: SequenceState) -> list[int]:
        """Retain ``state`` (most recent); returns the sequences evicted to stay in bounds."""
        self.entries[state.seq] = state
        evicted = []
        while self.entries and self.tokens > self.max_tokens:
            seq, _ = self.entries.popitem(last=False)
            evicted.append(seq)
        return evicted


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ServeEngine:
    """Runs batches of requests on this rank's shard (call :meth:`run` on every rank alike).

    Args:
        runner: this rank's model runner (it owns the KV cache).
        max_cache_tokens: tokens that finished requests may keep cached (over all CP ranks).
    """

    def __init__(self, runner: ModelRunner, *, max_cache_tokens: int) -> None:
        self.runner = runner
        self.cfg = runner.cfg
        self.pg = runner.pg
        self.retained = PrefixCache(max_cache_tokens)
        self._next_seq = 0

    def _assign(self, req: Request) -> tuple[SequenceState, list[int]]:
        """A sequence for ``req``: a retained one cut to the shared prefix, or a new one."""
        seq, shared = self.retained.match(req.tokens) if not req.logprobs else (None, 0)
        shared = min(shared, len(req.tokens) - 1)  # at least one token to compute logits from
        if seq is not None and shared > 0:
            state = self.retained.take(seq)
            self.runner.cache.truncate(seq, shared)
            state.history, state.uncached = list(req.tokens[:shared]), []
            return state, list(req.tokens[shared:])
        state = SequenceState(seq=self._next_seq)
        self._next_seq += 1
        return state, list(req.tokens)

    @torch.no_grad()
    def run(
        self,
        requests: Sequence[Request],
        emit: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], set[int]] | None = None,
    ) -> dict[int, Outcome]:
        """Generate for every request; the same call on every rank.

        Args:
            emit: called with (rid, token) as each token is sampled (rank 0 streams them).
            cancelled: rank 0's set of requests whose client left; they stop at the next check.

        Returns:
            Per request id, its outcome (errors are agreed by all ranks: see :func:`on_all_ranks`).
        """
        states, new = [], []
        for req in requests:
            s, n = self._assign(req)
            states.append(s)
            new.append(n)
        outcomes = {
            r.rid: Outcome(prompt_tokens=len(r.tokens), cached_tokens=len(r.tokens) - len(n))
            for r, n in zip(requests, new, strict=True)
        }
        try:
            on_all_ranks(lambda: self._generate(requests, states, new, outcomes, emit, cancelled))
        except RankFailure as e:
            for s in states:  # the batch's sequences are in an unknown state: drop them
                self.runner.cache.free(s.seq)
            for o in outcomes.values():
                o.finish_reason, o.error = "error", str(e)
            return outcomes
        for req, s in zip(requests, states, strict=True):
            o = outcomes[req.rid]
            if o.finish_reason == "cancelled":
                self.runner.cache.free(s.seq)
                continue
            for seq in self.retained.put(s):
                self.runner.cache.free(seq)
        return outcomes

    def _generate(self, requests, states, new, outcomes, emit, cancelled) -> None:
        runner = self.runner
        sched = Scheduler(
            cp=self.pg.cp, vocab_size=self.cfg.vocab_size, max_seq_len=self.cfg.max_seq_len,
            device=runner.device, seqs=states,
        )  # fmt: skip
        sched.add_turn(
            new,
            [r.sampling.max_new_tokens for r in requests],
            [r.sampling.eos_ids for r in requests],
        )
        gens = [
            torch.Generator(device=runner.device).manual_seed(r.sampling.seed) for r in requests
        ]

        want = any(r.logprobs for r in requests)
        for r in requests:
            if r.logprobs:
                outcomes[r.rid].logprobs = []

        def step(batch) -> None:
            logits = runner.step(batch, prompt_logprobs=want)
            tokens = chosen = None
            if logits is not None:  # per-request sampling: each answer as if it ran alone
                tokens = torch.cat([
                    sample(logits[j : j + 1], r.sampling, gens[j])
                    for j, r in enumerate(requests)
                ])  # fmt: skip
                if want:
                    logp = torch.log_softmax(logits, dim=-1)
                    chosen = logp.gather(1, tokens[:, None])[:, 0].double()
            tokens = runner.share_tokens(tokens, batch).tolist()
            if want:
                chosen = runner.share(chosen, (len(requests),), torch.float64).tolist()
                if batch.kind == "prefill":
                    prompt = runner.share_object(runner.prompt_logprobs)
                    for r, lp in zip(requests, prompt, strict=True):
                        if r.logprobs:
                            outcomes[r.rid].logprobs += lp
            if batch.kind == "prefill":
                sched.prefilled(batch)
            before = [len(s.out) for s in sched.seqs]
            sched.record(batch, tokens)
            for j, (r, s, n) in enumerate(zip(requests, sched.seqs, before, strict=True)):
                if len(s.out) > n:
                    if r.logprobs:
                        outcomes[r.rid].logprobs.append(chosen[j])
                    if emit is not None:
                        emit(r.rid, s.out[-1])

        batch = sched.prefill_batch(lambda new, cached: runner.resolve_variant("auto", new, cached))
        step(batch)
        n_steps = 0
        while not sched.turn_done:
            n_steps += 1
            if n_steps % CANCEL_EVERY == 0:
                self._apply_cancellations(requests, sched, outcomes, cancelled)
                if sched.turn_done:
                    break
            step(sched.decode_batch())
        for r, s in zip(requests, sched.seqs, strict=True):
            o = outcomes[r.rid]
            o.tokens = list(s.out)
            if o.finish_reason != "cancelled":
                o.finish_reason = "stop" if s.out and s.out[-1] in s.eos_ids else "length"
        sched.finish_turn()

    def _apply_cancellations(self, requests, sched, outcomes, cancelled) -> None:
        """Rank 0 says which requests lost their client; every rank stops them alike."""
        flags = torch.zeros(len(requests), dtype=torch.long)
        if dist.get_rank() == 0 and cancelled is not None:
            gone = cancelled()
            for j, r in enumerate(requests):
                flags[j] = int(r.rid in gone)
        if dist.get_world_size() > 1:
            dist.broadcast(flags, src=0)
        for j, (r, s) in enumerate(zip(requests, sched.seqs, strict=True)):
            if flags[j] and not s.done:
                s.done = True
                outcomes[r.rid].finish_reason = "cancelled"


class ServeLoop:
    """Rank 0 sends each batch to every rank; the others follow until told to stop.

    Messages go over the default group by ``broadcast_object_list``. An idle rank 0 sends a
    heartbeat every ``idle_s`` so that waiting ranks never reach the process-group timeout.
    """

    def __init__(self, engine: ServeEngine, *, idle_s: float = 2.0) -> None:
        self.engine, self.idle_s = engine, idle_s

    @staticmethod
    def _send(message) -> object:
        box = [message]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def lead(
        self,
        next_batch: Callable[[float], list[Request] | None],
        emit: Callable[[int, int], None],
        cancelled: Callable[[], set[int]],
        done: Callable[[list[Request], dict[int, Outcome]], None],
    ) -> None:
        """Rank 0: run batches from ``next_batch`` (None: stop) until it says stop."""
        while True:
            batch = next_batch(self.idle_s)
            if batch is None:
                self._send(("stop", None))
                return
            if not batch:
                self._send(("idle", None))
                continue
            self._send(("batch", batch))
            t0 = time.perf_counter()
            outcomes = self.engine.run(batch, emit, cancelled)
            logger.info(
                "batch of %d: %d new tokens, %d reused from the cache, %.3fs",
                len(batch), sum(o.prompt_tokens - o.cached_tokens for o in outcomes.values()),
                sum(o.cached_tokens for o in outcomes.values()), time.perf_counter() - t0,
            )  # fmt: skip
            done(batch, outcomes)

    def follow(self) -> None:
        """Every other rank: run what rank 0 sends until it says stop."""
        while True:
            kind, batch = self._send(None)
            if kind == "stop":
                return
            if kind == "batch":
                self.engine.run(batch)
