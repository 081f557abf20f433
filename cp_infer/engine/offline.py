"""Offline generation under TP x CP x PP x EP: the engine core with its requests submitted up
front.

Every prompt is one request to :class:`~cp_infer.engine.core.EngineCore` (the same core the
server drives): its new tokens are prefilled load-balanced over the CP ranks (ring attention
over whatever its sequence has cached), then it decodes with the others (one token per sequence
on every CP rank, KV-cache-parallel attention) until EOS or its budget. :class:`Conversation`
keeps the engine between calls: a chat's next turn is a request for its whole history, and the
engine's prefix matching finds that history in the cache, so only the new turn is prefilled
(persistent-KV prefill, paper §3.3).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from cp_infer.engine.core import EngineCore, Request, check_request
from cp_infer.engine.kv_cache import DEFAULT_BLOCK_SIZE
from cp_infer.engine.runner import ModelRunner
from cp_infer.engine.sampling import SamplingConfig
from cp_infer.hardware import Profile
from cp_infer.models.llama import Transformer
from parallel_state import ParallelGroups

__all__ = ["Conversation", "GenerationResult", "generate", "new_engine", "pool_tokens"]


@dataclass
class GenerationResult:
    """Generated token ids per prompt (EOS included when hit), the first step's logits, timings.

    Attributes:
        tokens: generated ids per prompt.
        first_logits: (B, V) float32 logits of the first generated position (last PP stage
            only; None elsewhere).
        ttft_s: time to first token on this rank: until every prompt had its first token.
        decode_step_s: wall time of every decode step on this rank (TTIT samples).
        prefill_variant: the ring variant the prefill used (chosen by the hardware model for "auto";
            the most used one over the steps of a chunked prefill).
        prefill_tokens: new tokens the prefill computed (all sequences).
        logprobs: with ``logprobs=N``, each generated token's log-probability (under the
            model's distribution, before temperature and top-p), per prompt.
        top_logprobs: with ``logprobs=N``, at each generated position the N most likely
            tokens as (id, log-probability), most likely first.
        seqs: the cached sequence each prompt left in the engine (its K/V: a hand-off's
            source).
        placed: the leader's count of the prompts run on the ring (``"ring"``), on single CP
            ranks (``"rank"``), and chats moved onto the ring (``"moved"``) (zeros elsewhere).
    """

    tokens: list[list[int]]
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    ttft_s: float = 0.0
    decode_step_s: list[float] = field(default_factory=list)
    prefill_variant: str = "pass-kv"
    prefill_tokens: int = 0
    logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None
    seqs: list[int | None] = field(default_factory=list)
    placed: dict[str, int] = field(default_factory=dict)


@dataclass
class Conversation:
    """What a batch of chats keeps between turns: the engine (whose KV cache holds this rank's
    share of every token so far) and each chat's tokens.

    Pass the same object to :func:`generate` turn after turn (on every rank); each turn's
    prompts are appended to the histories, and the engine finds those histories cached, so
    earlier turns are never recomputed.
    """

    engine: EngineCore | None = None
    history: list[list[int]] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count, repr=False)


@torch.no_grad()
def generate(
    model: Transformer,
    pg: ParallelGroups,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    *,
    variant: str = "pass-kv",
    kernel: str = "auto",
    conversation: Conversation | None = None,
    progress: bool = False,
    hardware: Profile | None = None,
    exchange: str = "auto",
    timeout_s: float = 60.0,
    kv_dtype: str = "auto",
    prefill_chunk: int | None = None,
    logprobs: int | None = None,
    seeds: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    kv_tokens: int | None = None,
    on_tokens: Callable[[int, int], None] | None = None,
    ring_min_tokens: int | str = 0,
) -> GenerationResult:
    """Generate up to ``sampling.max_new_tokens`` tokens for every prompt.

    Must be called on every rank with the same arguments. The batch is prefilled at once.

    Args:
        model: this rank's shard of the model (:func:`cp_infer.parallel.parallelize`).
        pg: the parallel layout.
        prompts: token ids per sequence (the new turn's, when continuing a conversation).
        sampling: how to pick tokens.
        variant: ring attention variant of the prefill: ``"pass-kv"``, ``"pass-q"``, or
            ``"auto"`` for the one the hardware model predicts faster from the new and cached
            token counts (the paper's Alg. 1 with all of the model's costs).
        kernel: local attention kernel.
        conversation: continue these chats (updated in place); None for a fresh batch.
        progress: show a progress bar (one step per layer of this stage) on prefills that
            take more than a second.
        hardware: the hardware model ``"auto"`` weighs (:mod:`cp_infer.hardware`); default: the
            built-in profile of the model's device (:func:`hardware_for`).
        exchange: how decode shares attention partials over CP (see
            :func:`cp_infer.collectives.make_exchange`).
        timeout_s: how long a shared-memory exchange waits for a peer before it raises.
        kv_dtype: ``"fp8_e4m3"`` keeps the KV cache (and what pass-KV sends) in FP8.
        prefill_chunk: prefill at most this many new tokens per sequence per step, each chunk
            over the cache the earlier ones left (persistent-KV prefill); None: in one step.
        logprobs: also return each generated token's log-probability and the ``logprobs``
            most likely tokens at its position (:attr:`GenerationResult.logprobs`).
        seeds: each prompt's sampling seed (default: ``sampling.seed`` for all). Every prompt
            samples from a generator of its own: its tokens do not depend on the batch.
        names: the prompts' names in error messages (a JSONL line's ``id``, say).
        kv_tokens: token slots of each rank's KV pool (allocated on the first call). Default:
            what these requests need at most; with a ``conversation``, room for every chat to
            reach the model's ``max_seq_len``. A smaller pool makes requests wait or be
            preempted (recomputed) when it is full; the answers stay the same.
        on_tokens: called on every rank with (prompt index, token) as each token is sampled
            (streaming its text, say).
        ring_min_tokens: prompts (with their history) shorter than this run on a single CP
            rank, longer ones on the ring; ``"auto"``: from the hardware model (see
            :class:`~cp_infer.engine.core.EngineCore`). Set when the engine is made (a
            conversation's first call).
    """
    conv = conversation if conversation is not None else Conversation()
    history = conv.history or [[] for _ in prompts]
    if len(history) != len(prompts):
        raise ValueError(
            f"the conversation has {len(history)} sequences but {len(prompts)} prompts were "
            "given; pass one new prompt per sequence"
        )
    if not prompts:
        raise ValueError("no prompts given: the input file is empty")
    seeds = list(seeds) if seeds is not None else [sampling.seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
    names = [f"prompt {n!r}" for n in (names if names is not None else range(len(prompts)))]
    for p, h, name in zip(prompts, history, names, strict=True):
        check_request(p, sampling.max_new_tokens, vocab_size=model.cfg.vocab_size,
                      max_seq_len=model.cfg.max_seq_len, earlier=len(h), name=name,
                      budget="max_new_tokens")  # fmt: skip
    if conv.engine is None:
        if kv_tokens is None:  # each sequence's share on the rank that gets the most, in blocks
            lengths = ([model.cfg.max_seq_len] * len(prompts) if conversation is not None
                       else [len(h) + len(p) + sampling.max_new_tokens
                             for p, h in zip(prompts, history, strict=True)])  # fmt: skip
            kv_tokens = pool_tokens(lengths, pg.cp)
        conv.engine = new_engine(
            model, pg, kernel=kernel, exchange=exchange, hardware=hardware, timeout_s=timeout_s,
            kv_dtype=kv_dtype, kv_tokens=kv_tokens, max_batch=len(prompts),
            ring_min_tokens=ring_min_tokens,
        )  # fmt: skip
    engine = conv.engine
    engine.configure(variant=variant, prefill_chunk=prefill_chunk, progress=progress)
    requests = [
        Request(next(conv._ids), tuple(h + list(p)), replace(sampling, seed=seed),
                top_logprobs=logprobs, first_logits=True)
        for p, h, seed in zip(prompts, history, seeds, strict=True)
    ]  # fmt: skip
    emit = None
    if on_tokens is not None:
        index = {r.rid: i for i, r in enumerate(requests)}

        def emit(events) -> None:
            for rid, token, _ in events:
                on_tokens(index[rid], token)

    before = engine.placement_stats()
    outcomes, steps = engine.run(requests, emit)
    after = engine.placement_stats()
    conv.history = [list(r.tokens) + o.tokens for r, o in zip(requests, outcomes, strict=True)]
    # (a pass with rows placed on single ranks is a decode step when it prefilled nothing)
    prefills = [s for s in steps if s.prefill_tokens]
    decodes = [s for s in steps if not s.prefill_tokens]
    variants = Counter(s.variant for s in prefills if s.variant is not None)
    first = [o.first_logits for o in outcomes]
    return GenerationResult(
        tokens=[o.tokens for o in outcomes],
        first_logits=torch.stack(first) if all(f is not None for f in first) else None,
        ttft_s=max(o.ttft_s or 0.0 for o in outcomes),
        decode_step_s=[s.seconds for s in decodes],
        prefill_variant=variants.most_common(1)[0][0] if variants else "pass-kv",
        prefill_tokens=sum(s.prefill_tokens for s in prefills),
        logprobs=[o.logprobs for o in outcomes] if logprobs is not None else None,
        top_logprobs=[o.top_logprobs for o in outcomes] if logprobs is not None else None,
        seqs=[o.seq for o in outcomes],
        placed={k: after[k] - before[k] for k in ("ring", "rank", "moved")},
    )


def pool_tokens(lengths: Sequence[int], cp: int) -> int:
    """Slots of each rank's KV pool that sequences of ``lengths`` tokens need at most: each
    one's share on the rank that gets the most, in blocks."""
    return sum(-(-n // cp) + 3 * DEFAULT_BLOCK_SIZE for n in lengths)


def new_engine(
    model: Transformer, pg: ParallelGroups, *, kv_tokens: int, max_batch: int,
    kernel: str = "auto", exchange: str = "auto", hardware: Profile | None = None,
    timeout_s: float = 60.0, kv_dtype: str = "auto", ring_min_tokens: int | str = 0,
) -> EngineCore:  # fmt: skip
    """An engine core for offline use: a runner with a KV pool of ``kv_tokens`` slots a rank
    (the arguments are :func:`generate`'s)."""
    runner = ModelRunner(
        model, pg, kernel=kernel, exchange=exchange, hardware=hardware, timeout_s=timeout_s,
        kv_dtype=kv_dtype, kv_tokens=kv_tokens,
    )  # fmt: skip
    return EngineCore(runner, max_batch=max_batch, ring_min_tokens=ring_min_tokens)
