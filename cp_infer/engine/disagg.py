"""Offline generation split over two tiers: the prefill tier prefills and samples each prompt's
first token, its K/V move to the decode tier resharded (:mod:`cp_infer.engine.handoff`), and the
decode tier decodes the rest.

Both tiers run the one engine core, each in its own layout (a job of ``--prefill tp=1,cp=2
--decode tp=2``: :mod:`parallel_state.tiers`). The decode tier's engine holds each handed-off
prompt as a retained sequence (:meth:`EngineCore.adopt`); the request for the prompt and its
first token then finds it in the cache, as a chat's next turn finds its history, and prefills
that one token over it before it decodes. In exact arithmetic (and, greedy, token for token in
fp32) the tokens are those of one engine running both.

Per prompt, in order, on the hand-off group::

    prefill tier rank 0  --first tokens------------------------------>  every decode rank
    decode tier rank 0   --positions its cache holds (skip)----------->  every prefill rank
    every prefill rank   --its tokens' positions, then K/V a layer---->  the decode ranks of
                                                                         its heads
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from cp_infer.engine.generate import Conversation, generate, new_engine, pool_tokens
from cp_infer.engine.handoff import HandoffStats, receive_kv, send_kv
from cp_infer.engine.sampling import SamplingConfig
from cp_infer.models.llama import Transformer
from parallel_state import ParallelGroups
from parallel_state.tiers import TierGroups

__all__ = ["DisaggregatedResult", "generate_disaggregated"]

logger = logging.getLogger(__name__)


@dataclass
class DisaggregatedResult:
    """What a tier did: the tokens (complete on the decode tier: the first from the prefill
    tier, the rest decoded; the first alone on the prefill tier) and the hand-off's counts
    (this rank's, one per prompt)."""

    tokens: list[list[int]]
    handoff: list[HandoffStats] = field(default_factory=list)


def generate_disaggregated(
    model: Transformer, pg: ParallelGroups, tiers: TierGroups, prompts: list[list[int]],
    sampling: SamplingConfig, *, seeds: Sequence[int] | None = None, **kwargs,
) -> DisaggregatedResult:  # fmt: skip
    """Generate ``sampling.max_new_tokens`` tokens per prompt over the two tiers (call on
    every rank of both, with the same arguments; ``model`` and ``pg`` are this rank's tier's).

    Args:
        kwargs: :func:`generate`'s options (variant, kernel, kv_dtype, hardware, ...), for
            both tiers.
    """
    group = tiers.handoff
    first = torch.zeros(len(prompts), dtype=torch.int64)
    eos = set(sampling.eos_ids)
    if tiers.tier is tiers.prefill:
        conv = Conversation()
        res = generate(model, pg, prompts, replace(sampling, max_new_tokens=1), seeds=seeds,
                       conversation=conv, **kwargs)  # fmt: skip
        if tiers.rank == tiers.prefill.first:
            first = torch.tensor([t[0] for t in res.tokens], dtype=torch.int64)
            for r in range(tiers.decode.size):
                group.send([first], tiers.decode.world_rank(r), 0).wait()
        stats = []
        for seq, prompt in zip(res.seqs, prompts, strict=True):
            skip = torch.zeros(1, dtype=torch.int64)
            group.recv([skip], tiers.decode.first, 0).wait()
            stats.append(send_kv(conv.engine, seq, tiers=tiers, length=len(prompt),
                                 skip=int(skip)))  # fmt: skip
        return DisaggregatedResult(tokens=res.tokens, handoff=stats)

    group.recv([first], tiers.prefill.first, 0).wait()
    engine = new_engine(
        model, pg, kv_tokens=pool_tokens([len(p) + sampling.max_new_tokens for p in prompts], pg.cp),
        max_batch=len(prompts),
        **{k: kwargs[k] for k in ("kernel", "exchange", "hardware", "timeout_s", "kv_dtype")
           if k in kwargs},
    )  # fmt: skip
    stats = []
    for p in prompts:
        skip = torch.tensor([engine.cached_prefix(p)[1]], dtype=torch.int64)
        if tiers.rank == tiers.decode.first:
            for r in range(tiers.prefill.size):
                group.send([skip], tiers.prefill.world_rank(r), 0).wait()
        stats.append(receive_kv(engine, list(p), tiers=tiers, skip=int(skip))[1])
    tokens = [[int(t)] for t in first]
    more = [k for k, t in enumerate(tokens) if t[0] not in eos and sampling.max_new_tokens > 1]
    if more:
        seeds = list(seeds) if seeds is not None else [sampling.seed] * len(prompts)
        conv = Conversation(engine=engine, history=[list(prompts[k]) for k in more])
        decoded = generate(
            model, pg, [tokens[k] for k in more],
            replace(sampling, max_new_tokens=sampling.max_new_tokens - 1),
            seeds=[seeds[k] for k in more], conversation=conv, **kwargs,
        )  # fmt: skip
        for k, out in zip(more, decoded.tokens, strict=True):
            tokens[k] += out
    return DisaggregatedResult(tokens=tokens, handoff=stats)
