"""The scheduler: what every sequence has, and the batch of the next step.

It is host-side bookkeeping, run alike on every rank (no communication): the tokens of every
sequence so far, which of them the KV cache holds, the round-robin counter of its decode tokens,
and the current turn's generations. The engine core (:class:`~cp_infer.engine.core.EngineCore`)
admits a sequence's turn, asks for each step's batch and records what was sampled::

    sched.admit(state, new_tokens, max_new, eos_ids)
    batch = sched.prefill_batch(variant, take={state.seq: n})   # -> runner.step(batch)
    rows = sched.prefilled(batch)                               # rows whose prompt is done
    sched.record_rows(batch, {seq: token, ...})                 # their first tokens
    batch = sched.decode_batch()                                # one token per running one
    ...
    state = sched.retire(state.seq)                             # its turn folded in
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cp_infer.engine.batch import StepBatch
from cp_infer.engine.kv_cache import decode_owner
from cp_infer.sharding import ShardLayout

__all__ = ["Scheduler", "SequenceState"]


@dataclass
class SequenceState:
    """One sequence, across turns.

    Attributes:
        seq: its KV cache slot.
        history: every token so far (prompts and generations).
        uncached: the tail of ``history`` not in the cache (the last generated token, which
            never went through the model); it leads the next turn's new tokens.
        decode_steps: decode tokens cached so far (continues the round-robin placement).
        prompt: this turn's new tokens.
        out: this turn's generated tokens.
        done: this turn has ended (EOS or the token budget).
        fed_cached: whether the last generated token is in the cache.
        max_new: this turn's token budget.
        eos_ids: tokens that end this turn.
        prefilled: this turn's new tokens already prefilled.
        rank: the CP rank the turn is placed on (its KV all there, its passes run there
            alone); None: it runs on the ring.
        owner: whoever runs the turn keeps its record here (the engine core: the request, its
            outcome and generator), so the scheduler's sequences are the one registry of what
            runs.
    """

    seq: int
    history: list[int] = field(default_factory=list)
    uncached: list[int] = field(default_factory=list)
    decode_steps: int = 0
    prompt: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    done: bool = False
    fed_cached: bool = False
    max_new: int = 0
    eos_ids: Collection[int] = ()
    prefilled: int = 0  # this turn's new tokens already prefilled (chunked prefill)
    rank: int | None = None  # placed on this CP rank; None: the ring
    owner: Any = field(default=None, repr=False)  # the engine core's record of this turn

    @property
    def new(self) -> list[int]:
        """This turn's new tokens: the uncached tail, then the prompt."""
        return self.uncached + self.prompt

    @property
    def cached(self) -> int:
        """Tokens of the sequence in the cache, over all CP ranks."""
        return len(self.history) - len(self.uncached)


class Scheduler:
    """The sequences whose turn runs; builds each step's batch.

    Args:
        cp: context-parallel size.
        device: where batches put their tensors.
    """

    def __init__(self, *, cp: int, device: torch.device) -> None:
        self.cp, self.device = cp, device
        self.seqs: list[SequenceState] = []

    def admit(
        self, state: SequenceState, prompt: Sequence[int], max_new: int,
        eos_ids: Collection[int] = (),
    ) -> None:  # fmt: skip
        """Start a turn of one more sequence (checked by the door: ``check_request``)."""
        if any(s.seq == state.seq for s in self.seqs):
            raise ValueError(f"sequence {state.seq} is already scheduled")
        state.prompt, state.out, state.done, state.fed_cached = list(prompt), [], False, False
        state.max_new, state.eos_ids, state.prefilled = max_new, frozenset(eos_ids), 0
        self.seqs.append(state)

    def prefill_batch(
        self, variant: str | Callable[[int, int], str], *, take: Mapping[int, int],
        rank: int | None = None,
    ) -> StepBatch | None:  # fmt: skip
        """The next prefill step: ``take[seq]`` more new tokens of each sequence in it, over
        what is cached, its earlier chunks included; the others sit the step out.

        Args:
            variant: the ring variant, or a function of (new tokens, cached tokens) choosing it
                (per chunk: later chunks see more cache).
            take: the tokens each sequence (by id) prefills this step.
            rank: the batch of the sequences placed on this CP rank (None: of the ring's);
                None is returned when it has none.
        """
        rows = [j for j, s in enumerate(self.seqs)
                if s.prefilled < len(s.new) and take.get(s.seq, 0) > 0
                and s.rank == rank]  # fmt: skip
        if not rows:
            return None
        tokens, starts = [], []
        for j in rows:
            s = self.seqs[j]
            step = min(take[s.seq], len(s.new) - s.prefilled)
            tokens.append(tuple(s.new[s.prefilled : s.prefilled + step]))
            starts.append(s.cached + s.prefilled)
        if rank is not None:  # one rank attends alone: a ring of one
            variant = "pass-kv"
        elif callable(variant):
            variant = variant(sum(len(t) for t in tokens), sum(starts))
        return StepBatch(
            kind="prefill", seqs=tuple(self.seqs[j].seq for j in rows), tokens=tuple(tokens),
            starts=tuple(starts), cp=self.cp, device=self.device, rank=rank,
            layout=ShardLayout([len(t) for t in tokens], 1 if rank is not None else self.cp),
            variant=variant,
        )  # fmt: skip

    def prefilled(self, batch: StepBatch) -> list[int]:
        """A prefill step ran: advance its sequences. Returns the batch rows of those whose
        turn is now wholly prefilled: their logits in this step are the turn's first."""
        by_seq = {s.seq: s for s in self.seqs}
        finished = []
        for row, (seq, tokens) in enumerate(zip(batch.seqs, batch.tokens, strict=True)):
            s = by_seq[seq]
            s.prefilled += len(tokens)
            if s.prefilled == len(s.new):
                finished.append(row)
        return finished

    def decode_batch(self, rank: int | None = None) -> StepBatch | None:
        """One token per running sequence (wholly prefilled, not done): its last one; of the
        ring's sequences, or (``rank``) of those placed on that CP rank. None: it has none."""
        seqs = [s for s in self.decoding if s.rank == rank]
        if not seqs:
            return None
        owners = (tuple(decode_owner(s.seq, s.decode_steps, self.cp) for s in seqs)
                  if rank is None else (rank,) * len(seqs))  # fmt: skip
        return StepBatch(
            kind="decode",
            seqs=tuple(s.seq for s in seqs),
            tokens=tuple((s.out[-1],) for s in seqs),
            starts=tuple(len(s.history) + len(s.prompt) + len(s.out) - 1 for s in seqs),
            cp=self.cp,
            device=self.device,
            owners=owners,
            rank=rank,
        )

    def placements(self) -> list[int | None]:
        """Where the running sequences are: the ring (None) first, then the ranks in order."""
        ranks = {s.rank for s in self.seqs}
        return (
            [None, *sorted(r for r in ranks if r is not None)] if None in ranks else sorted(ranks)
        )

    @property
    def decoding(self) -> list[SequenceState]:
        """Sequences past their prefill with tokens still to generate."""
        return [s for s in self.seqs if s.out and not s.done]

    def record_rows(self, batch: StepBatch, tokens: Mapping[int, int]) -> None:
        """The step ran: its decode tokens are cached, and ``tokens`` (by sequence id) were
        sampled for the sequences that have a next token (a prefill's finished rows)."""
        by_seq = {s.seq: s for s in self.seqs}
        if batch.kind == "decode":
            for seq in batch.seqs:
                by_seq[seq].decode_steps += 1
                by_seq[seq].fed_cached = True
        for seq, t in tokens.items():
            s = by_seq[seq]
            if not s.done:
                s.out.append(t)
                s.fed_cached = False
                s.done = t in s.eos_ids or len(s.out) >= s.max_new

    def drop(self, seq: int) -> SequenceState:
        """Stop scheduling ``seq`` as it is (preempted: its turn will be run again)."""
        j = next(j for j, s in enumerate(self.seqs) if s.seq == seq)
        return self.seqs.pop(j)

    def retire(self, seq: int) -> SequenceState:
        """End the turn of one sequence and stop scheduling it: its turn is folded into its
        history. Returns its state."""
        s = self.drop(seq)
        s.history += s.prompt + s.out
        s.uncached = [] if s.fed_cached else s.out[-1:]
        s.prompt = []
        return s
