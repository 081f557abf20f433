"""The scheduler: what every sequence has, and the batch of the next step.

It is host-side bookkeeping, run alike on every rank (no communication): the tokens of every
sequence so far, which of them the KV cache holds, the round-robin counter of its decode tokens,
and the current turn's generations. Each step it builds one :class:`StepBatch` (a prefill of the
turn's new tokens, then decode steps) and, once the step's tokens are sampled, records them.

A turn of a batch of sequences::

    sched.add_turn(prompts, max_new_tokens)          # checks, then the turn's new tokens
    batch = sched.prefill_batch(variant)             # -> runner.step(batch) -> sample
    sched.record(batch, tokens)
    while not sched.turn_done:
        batch = sched.decode_batch()
        ...
        sched.record(batch, tokens)
    outputs = sched.finish_turn()
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from cp_infer.engine.batch import StepBatch
from cp_infer.engine.kv_cache import decode_owner, decode_tokens_owned
from cp_infer.sharding import ShardLayout

__all__ = ["Scheduler", "SequenceState", "check_prompts"]


def check_prompts(
    prompts: Sequence[Sequence[int]],
    vocab_size: int,
    max_new: int,
    max_seq_len: int,
    history_lens: Sequence[int] | None = None,
    *,
    ids: Sequence[int | str] | None = None,
) -> None:
    """ValueError naming the prompt and the fix; pure, so every rank raises alike.

    Args:
        history_lens: tokens each sequence already has from earlier turns.
        ids: the prompts' names for messages (default: their positions).
    """
    if not prompts:
        raise ValueError("no prompts given: the input file is empty")
    history_lens = history_lens or [0] * len(prompts)
    names = [f"prompt {i!r}" for i in (ids if ids is not None else range(len(prompts)))]
    for name, p, before in zip(names, prompts, history_lens, strict=True):
        if len(p) == 0:
            raise ValueError(f"{name} is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"{name} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})"
            )
        total = before + len(p) + max_new
        if total > max_seq_len:
            earlier = f" after up to {before} tokens of earlier turns" if before else ""
            raise ValueError(
                f"{name} has {len(p)} tokens{earlier}; with max_new_tokens={max_new} the "
                f"context ({total}) exceeds the model's max_seq_len={max_seq_len}: "
                "shorten the prompt or lower --max-new-tokens"
            )


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

    @property
    def new(self) -> list[int]:
        """This turn's new tokens: the uncached tail, then the prompt."""
        return self.uncached + self.prompt

    @property
    def cached(self) -> int:
        """Tokens of the sequence in the cache, over all CP ranks."""
        return len(self.history) - len(self.uncached)


class Scheduler:
    """Sequences and their turns; builds each step's batch.

    Args:
        cp: context-parallel size.
        vocab_size: the model's true vocabulary (prompts are checked against it).
        max_seq_len: the model's context limit.
        device: where batches put their tensors.
    """

    def __init__(
        self,
        *,
        cp: int,
        vocab_size: int,
        max_seq_len: int,
        device: torch.device,
        seqs: Sequence[SequenceState] = (),
    ) -> None:
        self.cp, self.vocab_size, self.max_seq_len = cp, vocab_size, max_seq_len
        self.device = device
        self.seqs: list[SequenceState] = list(seqs)

    # -- a turn -----------------------------------------------------------------------------
    def add_turn(
        self,
        prompts: Sequence[Sequence[int]],
        max_new: int | Sequence[int],
        eos_ids: Collection[int] | Sequence[Collection[int]] = (),
    ) -> None:
        """Start a turn: one new prompt per sequence (the first turn creates the sequences).

        Args:
            max_new: the token budget, for every sequence or one per sequence.
            eos_ids: tokens that end a turn: one set for all, or (with per-sequence budgets)
                one set per sequence.
        """
        if self.seqs and len(self.seqs) != len(prompts):
            raise ValueError(
                f"the conversation has {len(self.seqs)} sequences but {len(prompts)} prompts "
                "were given; pass one new prompt per sequence"
            )
        per_seq = not isinstance(max_new, int)
        budgets = list(max_new) if per_seq else [max_new] * len(prompts)
        stops = list(eos_ids) if per_seq else [eos_ids] * len(prompts)
        before = [len(s.history) for s in self.seqs] or [0] * len(prompts)
        if not prompts:
            check_prompts(prompts, self.vocab_size, 0, self.max_seq_len)
        for j, (p, n, budget) in enumerate(zip(prompts, before, budgets, strict=True)):
            check_prompts([p], self.vocab_size, budget, self.max_seq_len, [n], ids=[j])
        if not self.seqs:
            self.seqs = [SequenceState(seq=j) for j in range(len(prompts))]
        for s, p, budget, stop in zip(self.seqs, prompts, budgets, stops, strict=True):
            s.prompt, s.out, s.done, s.fed_cached = list(p), [], False, False
            s.max_new, s.eos_ids, s.prefilled = budget, frozenset(stop), 0

    @property
    def new_tokens(self) -> int:
        """Tokens the turn's prefill computes (the uncached tails and the prompts)."""
        return sum(len(s.uncached) + len(s.prompt) for s in self.seqs)

    @property
    def cached_tokens(self) -> int:
        return sum(s.cached for s in self.seqs)

    @property
    def prefill_pending(self) -> bool:
        """Some sequence has new tokens of this turn not yet prefilled."""
        return any(s.prefilled < len(s.new) for s in self.seqs)

    def prefill_batch(
        self,
        variant: str | Callable[[int, int], str],
        *,
        chunk: int | None = None,
        take: Mapping[int, int] | None = None,
    ) -> StepBatch:
        """The turn's next prefill step: every sequence's next ``chunk`` new tokens (all of them
        for ``None``) over what is cached, its earlier chunks included.

        Args:
            variant: the ring variant, or a function of (new tokens, cached tokens) choosing it
                (Alg. 1 per chunk: later chunks see more cache).
            chunk: tokens per sequence per step (chunked prefill); sequences with nothing left
                sit the step out.
            take: instead of ``chunk``, the tokens each sequence (by id) prefills this step;
                sequences not in it sit the step out (a server's per-iteration token budget).
        """
        if chunk is not None and chunk < 1:
            raise ValueError(f"the prefill chunk must be >= 1 token, got {chunk}")
        rows = [j for j, s in enumerate(self.seqs) if s.prefilled < len(s.new)]
        if take is not None:
            rows = [j for j in rows if take.get(self.seqs[j].seq, 0) > 0]
        tokens, starts, reserve = [], [], [[] for _ in range(self.cp)]
        for j in rows:
            s = self.seqs[j]
            left = len(s.new) - s.prefilled
            want = take[s.seq] if take is not None else chunk
            step = left if want is None else min(want, left)
            tokens.append(tuple(s.new[s.prefilled : s.prefilled + step]))
            starts.append(s.cached + s.prefilled)
            # the first chunk reserves what each rank will store this turn: its shard of every
            # chunk, then its decode tokens (the last generated token is never fed back, so
            # max_new - 1 of them are stored); later chunks land in that room
            # (later chunks are assumed the size of this one; if they differ, the cache grows)
            sizes = [step] if s.prefilled else _chunks(left, step)
            fed = 0 if s.prefilled else max(s.max_new - 1, 0)
            for r in range(self.cp):
                shards = sum(ShardLayout([n], self.cp).valid_kv_len(0, r) for n in sizes)
                decode = decode_tokens_owned(s.seq, s.decode_steps + fed, self.cp, r)
                decode -= decode_tokens_owned(s.seq, s.decode_steps, self.cp, r)
                reserve[r].append(shards + decode)
        if callable(variant):
            variant = variant(sum(len(t) for t in tokens), sum(starts))
        return StepBatch(
            kind="prefill", seqs=tuple(self.seqs[j].seq for j in rows), tokens=tuple(tokens),
            starts=tuple(starts), cp=self.cp, device=self.device,
            layout=ShardLayout([len(t) for t in tokens], self.cp), variant=variant,
            reserve=tuple(tuple(r) for r in reserve),
        )  # fmt: skip

    def prefilled(self, batch: StepBatch) -> list[tuple[int, int]]:
        """A prefill step ran: advance its sequences. Returns (sequence index, batch row) of
        those whose turn is now wholly prefilled: their logits in this step are the turn's."""
        rows = {s.seq: j for j, s in enumerate(self.seqs)}
        finished = []
        for row, (seq, tokens) in enumerate(zip(batch.seqs, batch.tokens, strict=True)):
            s = self.seqs[rows[seq]]
            s.prefilled += len(tokens)
            if s.prefilled == len(s.new):
                finished.append((rows[seq], row))
        return finished

    def decode_batch(self, *, active_only: bool = False) -> StepBatch:
        """One token per sequence: the last generated one. A finished sequence rides along
        (its row keeps the batch's shape, so sampling draws alike) but is not stored.

        Args:
            active_only: only the sequences that are wholly prefilled and not done (a server's
                decodes, beside requests still prefilling or just admitted).
        """
        seqs = self.decoding if active_only else self.seqs
        return StepBatch(
            kind="decode",
            seqs=tuple(s.seq for s in seqs),
            tokens=tuple((s.out[-1],) for s in seqs),
            starts=tuple(len(s.history) + len(s.prompt) + len(s.out) - 1 for s in seqs),
            cp=self.cp,
            device=self.device,
            owners=tuple(
                -1 if s.done else decode_owner(s.seq, s.decode_steps, self.cp) for s in seqs
            ),
        )

    @property
    def decoding(self) -> list[SequenceState]:
        """Sequences past their prefill with tokens still to generate."""
        return [s for s in self.seqs if s.out and not s.done]

    def record(self, batch: StepBatch, tokens: Sequence[int]) -> None:
        """The step ran and sampled ``tokens`` (one per sequence): update every sequence."""
        self.record_rows(batch, dict(zip((s.seq for s in self.seqs), tokens, strict=True)))

    def record_rows(self, batch: StepBatch, tokens: Mapping[int, int]) -> None:
        """The step ran: its decode tokens are cached, and ``tokens`` (by sequence id) were
        sampled for the sequences that have a next token (a prefill's finished rows)."""
        by_seq = {s.seq: s for s in self.seqs}
        if batch.kind == "decode":
            for seq, owner in zip(batch.seqs, batch.owners, strict=True):
                if owner >= 0:
                    by_seq[seq].decode_steps += 1
                    by_seq[seq].fed_cached = True
        for seq, t in tokens.items():
            s = by_seq[seq]
            if not s.done:
                s.out.append(t)
                s.fed_cached = False
                s.done = t in s.eos_ids or len(s.out) >= s.max_new

    # -- continuous batching: sequences join and leave one at a time -------------------------
    def admit(
        self, state: SequenceState, prompt: Sequence[int], max_new: int,
        eos_ids: Collection[int] = (), *, name: int | str | None = None,
    ) -> None:  # fmt: skip
        """Start a turn of one more sequence (checked as :meth:`add_turn` checks prompts)."""
        if any(s.seq == state.seq for s in self.seqs):
            raise ValueError(f"sequence {state.seq} is already scheduled")
        check_prompts([prompt], self.vocab_size, max_new, self.max_seq_len,
                      [len(state.history)], ids=[state.seq if name is None else name])  # fmt: skip
        state.prompt, state.out, state.done, state.fed_cached = list(prompt), [], False, False
        state.max_new, state.eos_ids, state.prefilled = max_new, frozenset(eos_ids), 0
        self.seqs.append(state)

    def retire(self, seq: int) -> SequenceState:
        """End the turn of one sequence and stop scheduling it; returns its state."""
        j = next(j for j, s in enumerate(self.seqs) if s.seq == seq)
        s = self.seqs.pop(j)
        _fold(s)
        return s

    @property
    def turn_done(self) -> bool:
        return all(s.done for s in self.seqs)

    def finish_turn(self) -> list[list[int]]:
        """End the turn: fold it into the histories; returns every sequence's generation."""
        for s in self.seqs:
            _fold(s)
        return [s.out for s in self.seqs]


def _fold(s: SequenceState) -> None:
    """Fold a sequence's turn into its history."""
    s.history += s.prompt + s.out
    s.uncached = [] if s.fed_cached else s.out[-1:]
    s.prompt = []


def _chunks(n: int, chunk: int | None) -> list[int]:
    """Sizes of ``n`` tokens cut in chunks of ``chunk`` (one piece for None)."""
    if chunk is None or chunk >= n:
        return [n]
    return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
