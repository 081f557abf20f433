"""Generation under TP x CP x PP x EP: context-parallel prefill, then decode.

Prefill: every sequence of the batch is sharded load-balanced over the CP ranks; each pipeline
stage runs its layers on the local tokens (ring attention inside) and hands the hidden states to
the next stage. The last stage picks the hidden state of every sequence's last prompt token (one
CP rank holds it; an all-reduce over CP gives it to all), computes the logits and samples.

Decode: one token per sequence, replicated on the CP ranks; attention over the sharded cache by
KV-cache parallelism (:class:`~cp_infer.engine.attention.DecodeAttention`). Sampled tokens are
broadcast from the last stage along the pipeline, so every rank knows the next input and when
to stop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cp_infer.attention.kernels import get_kernel
from cp_infer.engine.attention import DecodeAttention, PrefillAttention
from cp_infer.engine.kv_cache import KVCache, decode_owner, decode_tokens_owned
from cp_infer.engine.sampling import SamplingConfig, sample
from cp_infer.models.llama import ForwardContext, Transformer
from cp_infer.parallel.pipeline import recv_activation, send_activation
from cp_infer.sharding import ShardLayout, shard
from parallel_state import ParallelGroups

__all__ = ["GenerationResult", "generate"]

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """Generated token ids per prompt (EOS included when hit), the first step's logits, timings.

    Attributes:
        tokens: generated ids per prompt.
        first_logits: (B, V) float32 logits of the first generated position (last PP stage
            only; None elsewhere).
        ttft_s: time to first token on this rank (prefill + first sampling).
        decode_step_s: wall time of every decode step on this rank (TTIT samples).
    """

    tokens: list[list[int]]
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    ttft_s: float = 0.0
    decode_step_s: list[float] = field(default_factory=list)


def check_prompts(
    prompts: list[list[int]], vocab_size: int, max_new: int, max_seq_len: int
) -> None:
    """ValueError naming the prompt and the fix; pure, so every rank raises alike."""
    if not prompts:
        raise ValueError("no prompts given: the input file is empty")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, {vocab_size})")
        if len(p) + max_new > max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new} the context "
                f"({len(p) + max_new}) exceeds the model's max_seq_len={max_seq_len}: "
                "shorten the prompt or lower --max-new-tokens"
            )


class _Pipeline:
    """Run one forward pass through this rank's stage, passing activations along PP."""

    def __init__(self, model: Transformer, pg: ParallelGroups, dim: int, dtype) -> None:
        self.model, self.pg, self.dim, self.dtype = model, pg, dim, dtype

    def __call__(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        pg = self.pg
        if pg.is_first_pp_stage:
            x = tokens
        else:
            x = recv_activation(
                (tokens.shape[0], self.dim), self.dtype, pg.pp_ranks[pg.pp_rank - 1], pg.pp_group
            )
        h = self.model(x, ctx)
        if not pg.is_last_pp_stage:
            send_activation(h, pg.pp_ranks[pg.pp_rank + 1], pg.pp_group)
            return None
        return h


def _last_token_hidden(h, layout: ShardLayout, pg: ParallelGroups) -> torch.Tensor:
    """(B, dim) hidden state of each sequence's last prompt token, on every CP rank."""
    index = layout.gather_index(pg.cp_rank)
    last = torch.tensor(layout.seq_offsets[1:]) - 1  # packed index of each last token
    out = torch.zeros(layout.n_seqs, h.shape[-1], dtype=h.dtype)
    for j, target in enumerate(last.tolist()):
        hit = (index == target).nonzero()
        if hit.numel():
            out[j] = h[hit[0, 0]]
    if pg.cp > 1:
        dist.all_reduce(out, group=pg.cp_group)  # exactly one rank contributes each row
    return out


def _broadcast_tokens(tokens: torch.Tensor | None, b: int, pg: ParallelGroups) -> torch.Tensor:
    """Sampled tokens from the last stage to every stage of this pipeline."""
    if pg.pp == 1:
        return tokens
    buf = tokens if tokens is not None else torch.empty(b, dtype=torch.long)
    dist.broadcast(buf, src=pg.pp_ranks[-1], group=pg.pp_group)
    return buf


@torch.no_grad()
def generate(
    model: Transformer,
    pg: ParallelGroups,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    *,
    variant: str = "pass-kv",
    kernel: str = "auto",
) -> GenerationResult:
    """Generate up to ``sampling.max_new_tokens`` tokens for every prompt.

    Must be called on every rank with the same arguments. The batch is prefilled at once.
    """
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    check_prompts(prompts, cfg.vocab_size, sampling.max_new_tokens, cfg.max_seq_len)
    b, max_new = len(prompts), sampling.max_new_tokens
    layout = ShardLayout([len(p) for p in prompts], pg.cp)
    attn_kernel = get_kernel(kernel)
    first_block = next(iter(model.layers.values()))
    capacity = [
        layout.valid_kv_len(j, pg.cp_rank) + decode_tokens_owned(j, max_new, pg.cp, pg.cp_rank)
        for j in range(b)
    ]
    cache = KVCache(
        list(model.layer_ids),
        capacity,
        first_block.attention.n_local_kv_heads,
        cfg.head_dim,
        dtype,
    )
    run = _Pipeline(model, pg, cfg.dim, dtype)
    generator = torch.Generator().manual_seed(sampling.seed)

    # -- prefill ----------------------------------------------------------------------------
    t_start = time.perf_counter()
    packed = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    tokens = shard(packed, layout, pg.cp_rank)
    ctx = ForwardContext(
        positions=layout.positions(pg.cp_rank),
        attention=PrefillAttention(
            layout, pg.cp_rank, pg.cp_group, cache, variant=variant, kernel=attn_kernel
        ),
    )
    h = run(tokens, ctx)
    cache.commit()
    first_logits = None
    next_tokens = None
    if h is not None:
        first_logits = model.logits(_last_token_hidden(h, layout, pg))
        next_tokens = sample(first_logits, sampling, generator)
    next_tokens = _broadcast_tokens(next_tokens, b, pg)
    ttft = time.perf_counter() - t_start

    # -- decode -----------------------------------------------------------------------------
    step_times: list[float] = []
    out = [[] for _ in range(b)]
    done = [False] * b
    lens = [len(p) for p in prompts]
    for step in range(max_new):
        for j, t in enumerate(next_tokens.tolist()):
            if not done[j]:
                out[j].append(t)
                done[j] = t == sampling.eos_id or len(out[j]) >= max_new
        if all(done) or step == max_new - 1:
            break
        t_step = time.perf_counter()
        owners = [decode_owner(j, step, pg.cp) for j in range(b)]
        ctx = ForwardContext(
            positions=torch.tensor([n + step for n in lens]),
            attention=DecodeAttention(cache, owners, pg.cp_rank, pg.cp_group, attn_kernel),
        )
        h = run(next_tokens, ctx)
        cache.commit()
        next_tokens = sample(model.logits(h), sampling, generator) if h is not None else None
        next_tokens = _broadcast_tokens(next_tokens, b, pg)
        step_times.append(time.perf_counter() - t_step)
    return GenerationResult(
        tokens=out, first_logits=first_logits, ttft_s=ttft, decode_step_s=step_times
    )
