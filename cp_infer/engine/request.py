"""What a request is and what it gets: the engine's types at its every door.

A door (the server's API, ``generate``, a tool) checks a request against the model and the pool
(:func:`check_request`, :func:`check_pool`: pure, so every rank refuses alike), hands the engine
core a :class:`Request`, and gets an :class:`Outcome`; :class:`Step` records each forward pass
and :class:`PoolStats` the KV pool. Torch-free: the API process imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cp_infer.engine.params import SamplingConfig
from cp_infer.engine.sizing import blocks_for_tokens
from cp_infer.schema import RequestError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Done", "Emit", "Outcome", "PoolStats", "Request", "Step", "check_pool", "check_request",
]  # fmt: skip

Done = Callable[[list["Request"], dict[int, "Outcome"]], None]
# (rid, token, its logprob and alternatives when the request asked for them)
# called once per sampling with every token it produced: [(rid, token, logprob)], the logprob
# being (its log-probability, its alternatives) when the request asked for them
Emit = Callable[[list[tuple[int, int, "tuple[float, list[tuple[int, float]]] | None"]]], None]


def check_request(
    tokens: Sequence[int], max_new: int, *, vocab_size: int, max_seq_len: int,
    earlier: int = 0, name: str = "the prompt", budget: str = "max_tokens",
) -> None:  # fmt: skip
    """The one check of a request against the model, before admission: a
    :class:`~cp_infer.schema.RequestError` naming the fix and the field at fault (``prompt`` or
    ``budget``). Pure, so every rank raises alike.

    Args:
        tokens: the request's new tokens.
        max_new: its token budget.
        earlier: tokens the sequence already has from earlier turns (a chat's history).
        name: how the message names the prompt (``prompt 'a7'`` for a JSONL line).
        budget: how the door names the token budget (``max_tokens``, ``--max-new-tokens``).
    """
    if len(tokens) == 0:
        raise RequestError(f"{name} is empty: give at least one token", "prompt")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(
            f"{name} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})", "prompt"
        )
    total = earlier + len(tokens) + max_new
    if total > max_seq_len:
        after = f" after up to {earlier} tokens of earlier turns" if earlier else ""
        raise RequestError(
            f"{name} has {len(tokens)} tokens{after}; with {budget}={max_new} the context "
            f"({total}) exceeds the model's max_seq_len={max_seq_len}: shorten the prompt or "
            f"lower {budget}",
            budget,
        )


def check_pool(
    n_tokens: int, max_new: int, *, n_blocks: int, block_size: int, cp: int,
    budget: str = "max_tokens",
) -> None:  # fmt: skip
    """A :class:`~cp_infer.schema.RequestError` naming the sizes when a request of ``n_tokens``
    and a budget of ``max_new`` could not fit the KV pool even alone. Pure."""
    need = blocks_for_tokens(n_tokens + max_new, cp, block_size)
    if need > n_blocks:
        raise RequestError(
            f"the prompt ({n_tokens} tokens) with {budget}={max_new} needs {need} KV blocks of "
            f"{block_size} tokens per CP rank, more than the pool's {n_blocks} "
            f"(--kv-cache-memory): shorten the prompt, lower {budget}, or raise "
            "--kv-cache-memory or --cp",
            budget,
        )


@dataclass(frozen=True)
class Request:
    """One sequence to generate for (picklable: rank 0 sends it to every rank).

    Attributes:
        rid: the request's number (unique while the server runs).
        tokens: the whole prompt (a chat's full history: the engine finds what is cached).
        sampling: budget, temperature, top-k/p, seed and EOS ids.
        logprobs: also return every token's log-probability (prompt and generated). Such a
            request prefills its whole prompt: cached tokens have no logits to give.
        top_logprobs: also return the generated tokens' log-probabilities, each position with
            its ``top_logprobs`` most likely tokens (OpenAI's ``logprobs``); with ``logprobs``,
            the prompt's positions too.
        first_logits: also return the logits of the first generated position
            (:attr:`Outcome.first_logits`; the CLI's ``--save-logits``, the tests' oracles).
        generated: tokens an earlier run of this request already delivered (the server's
            engine restarted under it). The engine resumes it as it resumes a preempted request:
            ``tokens`` and these prefilled again, the budget and ``min_tokens`` counting them, its
            generator advanced past their draws; the outcome's tokens include them (not their
            log-probabilities, unless ``logprobs`` recomputes the whole sequence's).
    """

    rid: int
    tokens: tuple[int, ...]
    sampling: SamplingConfig
    logprobs: bool = False
    top_logprobs: int | None = None
    first_logits: bool = False
    generated: tuple[int, ...] = ()

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs is not None


@dataclass
class Outcome:
    """What a request got."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS), "length" (budget), "cancelled", "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    logprobs: list[float] | None = None  # of tokens[1:] (with logprobs) + generated
    # aligned with logprobs, when top_logprobs was asked for: (id, logprob), most likely first
    top_logprobs: list[list[tuple[int, float]]] | None = None
    ttft_s: float | None = None  # from admission to the first token, on this rank
    # (V,) float32, with Request.first_logits, on the last pipeline stage (None elsewhere)
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    seq: int | None = None  # the cached sequence it left behind (retained for reuse)


@dataclass(frozen=True)
class Step:
    """One forward pass of the engine.

    Args:
        kind: ``"decode"`` (running requests only), ``"prefill"`` (waiting prompts only) or
            ``"mixed"`` (a prefill chunk fused with the decodes).
        seconds: its wall time on rank 0.
        prefill_tokens: new prompt tokens it prefilled.
        cached_tokens: tokens already in the cache that those attended to.
        decode_tokens: running requests it decoded a token for.
        variant: the ring variant of its prefill (None for a decode step).
    """

    kind: str
    seconds: float
    prefill_tokens: int = 0
    cached_tokens: int = 0
    decode_tokens: int = 0
    variant: str | None = None


@dataclass
class PoolStats:
    """The KV pool and prefix reuse as ``/metrics`` shows them (picklable; counts since start).

    Attributes:
        usage: fraction of the fullest rank's blocks that running requests hold (blocks that
            only finished requests keep, for reuse, count as free: as vLLM counts).
        free_blocks: blocks the fullest rank can give: free, or kept only for reuse.
        total_blocks: blocks per rank.
        block_size: tokens per block.
        cp: CP ranks the pool spans.
        retained_tokens: tokens finished requests keep cached over the CP ranks.
        preemptions: requests preempted (freed, recomputed later).
        waits: requests that waited for room in the pool before they were admitted.
        prefix_queries: prompt tokens looked up in the cache.
        prefix_hits: of those, tokens found cached (not prefilled).
        remote_prefills: requests a prefill tier prefilled (disaggregated serving).
        handoff_tokens: (token, head, layer) triples of K/V received from it, this rank.
        prefix_forgone: cached prefix tokens prefilled again because the one CP rank holding
            them was too busy (the request placed on another).
        ring_requests: requests placed on the ring (their KV over every CP rank).
        rank_requests: requests placed on a single CP rank.
        ring_moves: chats whose prefix lay on one rank and whose next turn went on the ring.
        rank_running: per CP rank, the running requests it holds KV for (ring ones count on
            every rank).
        rank_tokens: per CP rank, the context tokens of its running requests (a ring
            request's split evenly).
        tier_*: the KV tier's :class:`~cp_infer.engine.kv_tier.TierStats` (``tier_queries``,
            ``tier_hits``, ...; zeros without a tier).
    """

    usage: float = 0.0
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 0
    cp: int = 1
    retained_tokens: int = 0
    preemptions: int = 0
    waits: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    remote_prefills: int = 0
    handoff_tokens: int = 0
    prefix_forgone: int = 0
    ring_requests: int = 0
    rank_requests: int = 0
    ring_moves: int = 0
    rank_running: tuple[int, ...] = ()
    rank_tokens: tuple[int, ...] = ()
    tier_queries: int = 0
    tier_hits: int = 0
    tier_load_bytes: int = 0
    tier_load_s: float = 0.0
    tier_store_bytes: int = 0
    tier_store_s: float = 0.0
    tier_entries: int = 0
    tier_nbytes: int = 0
    tier_skipped: int = 0
    tier_spills_skipped: int = 0
