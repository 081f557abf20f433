"""Generation under TP x CP x PP x EP: a thin client of the scheduler and the model runner.

Each turn: the scheduler builds the prefill batch (every sequence's new tokens, sharded
load-balanced over the CP ranks, ring attention over the cached prefix), the runner runs it and
returns the last stage's logits, the sampled tokens go to every stage, and decode steps follow
(one token per sequence on every CP rank, KV-cache-parallel attention) until every sequence has
hit EOS or its budget. :class:`Conversation` keeps the scheduler and the runner (with its KV
cache) between turns, so a later turn prefills only its new tokens (persistent-KV prefill).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cp_infer.attention import VARIANTS
from cp_infer.attention.selector import Hardware
from cp_infer.engine.runner import ModelRunner
from cp_infer.engine.sampling import SamplingConfig, sample_rows
from cp_infer.engine.scheduler import Scheduler, check_prompts
from cp_infer.models.llama import Transformer
from parallel_state import ParallelGroups

__all__ = ["Conversation", "GenerationResult", "check_prompts", "generate"]


@dataclass
class GenerationResult:
    """Generated token ids per prompt (EOS included when hit), the first step's logits, timings.

    Attributes:
        tokens: generated ids per prompt.
        first_logits: (B, V) float32 logits of the first generated position (last PP stage
            only; None elsewhere).
        ttft_s: time to first token on this rank (prefill + first sampling).
        decode_step_s: wall time of every decode step on this rank (TTIT samples).
        prefill_variant: the ring variant the prefill used (chosen by Alg. 1 for "auto";
            the most used one over the chunks of a chunked prefill).
        prefill_tokens: new tokens the prefill computed (all sequences).
        logprobs: with ``logprobs=N``, each generated token's log-probability (under the
            model's distribution, before temperature and top-p), per prompt.
        top_logprobs: with ``logprobs=N``, at each generated position the N most likely
            tokens as (id, log-probability), most likely first.
    """

    tokens: list[list[int]]
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    ttft_s: float = 0.0
    decode_step_s: list[float] = field(default_factory=list)
    prefill_variant: str = "pass-kv"
    prefill_tokens: int = 0
    logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None


@dataclass
class Conversation:
    """What a batch of chats keeps between turns: the scheduler's sequences and the runner
    (whose KV cache holds this rank's share of every token so far).

    Pass the same object to :func:`generate` turn after turn (on every rank); each turn's
    prompts are appended to the history and prefilled over the cached prefix (persistent-KV
    prefill, paper §3.3), so earlier turns are never recomputed.
    """

    scheduler: Scheduler | None = None
    runner: ModelRunner | None = None

    @property
    def history(self) -> list[list[int]]:
        """Every sequence's tokens so far (prompts and generations)."""
        return [s.history for s in self.scheduler.seqs] if self.scheduler else []

    @property
    def cached_lens(self) -> list[int]:
        """Tokens of each sequence in the cache, over all CP ranks."""
        return [s.cached for s in self.scheduler.seqs] if self.scheduler else []


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
    hardware: Hardware | None = None,
    exchange: str = "auto",
    timeout_s: float = 60.0,
    kv_dtype: str = "auto",
    prefill_chunk: int | None = None,
    logprobs: int | None = None,
    seeds: Sequence[int] | None = None,
) -> GenerationResult:
    """Generate up to ``sampling.max_new_tokens`` tokens for every prompt.

    Must be called on every rank with the same arguments. The batch is prefilled at once.

    Args:
        model: this rank's shard of the model (:func:`cp_infer.parallel.parallelize`).
        pg: the parallel layout.
        prompts: token ids per sequence (the new turn's, when continuing a conversation).
        sampling: how to pick tokens.
        variant: ring attention variant of the prefill: ``"pass-kv"``, ``"pass-q"``, or
            ``"auto"`` to pick by the paper's Alg. 1 from the new and cached token counts.
        kernel: local attention kernel.
        conversation: continue these chats (updated in place); None for a fresh batch.
        progress: show a progress bar (one step per layer of this stage) on prefills that
            take more than a second.
        hardware: the compute and link speeds Alg. 1 weighs for ``"auto"``; default: the
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
    """
    if variant not in (*VARIANTS, "auto"):
        raise ValueError(f"unknown variant {variant!r}; choose one of {[*VARIANTS, 'auto']}")
    conv = conversation if conversation is not None else Conversation()
    if conv.runner is None:
        conv.runner = ModelRunner(
            model,
            pg,
            kernel=kernel,
            exchange=exchange,
            hardware=hardware,
            timeout_s=timeout_s,
            kv_dtype=kv_dtype,
        )
        conv.scheduler = Scheduler(
            cp=pg.cp, vocab_size=model.cfg.vocab_size, max_seq_len=model.cfg.max_seq_len,
            device=conv.runner.device,
        )  # fmt: skip
    runner, sched = conv.runner, conv.scheduler
    sched.add_turn(prompts, sampling.max_new_tokens, sampling.eos_ids)
    seeds = list(seeds) if seeds is not None else [sampling.seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
    generators = [torch.Generator(device=runner.device).manual_seed(s) for s in seeds]

    b, k = len(prompts), logprobs or 0
    lps: list[list[float]] = [[] for _ in prompts]
    tops: list[list[list[tuple[int, float]]]] = [[] for _ in prompts]

    def record(batch, logits) -> None:
        """Sample from the last stage's logits, share along the pipeline, record."""
        tokens = None
        if logits is not None:  # each row by its own generator, all rows in one pass
            tokens = sample_rows(logits, [sampling] * b, generators,
                                 [len(s.out) for s in sched.seqs])  # fmt: skip
        if logprobs is not None:
            chosen, alts = runner.share_logprobs(logits, tokens, k, b)
        before = [len(s.out) for s in sched.seqs]
        sched.record(batch, runner.share(tokens, (b,), torch.long).tolist())
        if logprobs is not None:  # the sequences that took a token (not the finished ones)
            for j, s in enumerate(sched.seqs):
                if len(s.out) > before[j]:
                    lps[j].append(chosen[j])
                    tops[j].append(alts[j])

    t_start = time.perf_counter()
    n_new, variants = sched.new_tokens, []
    rows: list[torch.Tensor | None] = [None] * len(prompts)
    while sched.prefill_pending:  # one step, or one per chunk (chunked prefill)
        batch = sched.prefill_batch(
            lambda new, cached: runner.resolve_variant(variant, new, cached), chunk=prefill_chunk
        )
        variants.append(batch.variant)
        logits = runner.step(batch, progress=progress)
        for j, row in sched.prefilled(batch):  # these sequences' last prompt token was here
            if logits is not None:
                rows[j] = logits[row]
    first_logits = torch.stack(rows) if rows[0] is not None else None
    record(batch, first_logits)
    ttft = time.perf_counter() - t_start
    step_times: list[float] = []
    while not sched.turn_done:
        t_step = time.perf_counter()
        step = sched.decode_batch()
        record(step, runner.step(step))
        step_times.append(time.perf_counter() - t_step)
    return GenerationResult(
        tokens=sched.finish_turn(),
        first_logits=first_logits,
        ttft_s=ttft,
        decode_step_s=step_times,
        prefill_variant=max(set(variants), key=variants.count),
        prefill_tokens=n_new,
        logprobs=lps if logprobs is not None else None,
        top_logprobs=tops if logprobs is not None else None,
    )
