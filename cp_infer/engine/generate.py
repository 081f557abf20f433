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
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from cp_infer.attention import VARIANTS
from cp_infer.attention.kernels import get_kernel
from cp_infer.attention.selector import Hardware, choose_variant, hardware_for
from cp_infer.engine.attention import DecodeAttention, PrefillAttention
from cp_infer.engine.kv_cache import KVCache, decode_owner, decode_tokens_owned
from cp_infer.engine.sampling import SamplingConfig, sample
from cp_infer.models.llama import ForwardContext, Transformer
from cp_infer.parallel.pipeline import recv_activation, send_activation
from cp_infer.sharding import ShardLayout, shard
from parallel_state import ParallelGroups

__all__ = ["Conversation", "GenerationResult", "generate"]

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
        prefill_variant: the ring variant the prefill used (chosen by Alg. 1 for "auto").
        prefill_tokens: new tokens the prefill computed (all sequences).
    """

    tokens: list[list[int]]
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    ttft_s: float = 0.0
    decode_step_s: list[float] = field(default_factory=list)
    prefill_variant: str = "pass-kv"
    prefill_tokens: int = 0


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


class _Pipeline:
    """Run one forward pass through this rank's stage, passing activations along PP."""

    def __init__(self, model: Transformer, pg: ParallelGroups, dim: int, dtype, device) -> None:
        self.model, self.pg, self.dim, self.dtype, self.device = model, pg, dim, dtype, device

    def __call__(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        pg = self.pg
        if pg.is_first_pp_stage:
            x = tokens
        else:
            x = recv_activation(
                (tokens.shape[0], self.dim),
                self.dtype,
                pg.pp_ranks[pg.pp_rank - 1],
                pg.pp_group,
                self.device,
            )
        h = self.model(x, ctx)
        if not pg.is_last_pp_stage:
            send_activation(h, pg.pp_ranks[pg.pp_rank + 1], pg.pp_group)
            return None
        return h


def _last_token_hidden(h, layout: ShardLayout, pg: ParallelGroups) -> torch.Tensor:
    """(B, dim) hidden state of each sequence's last prompt token, on every CP rank."""
    where = {t: i for i, t in enumerate(layout.gather_index(pg.cp_rank).tolist()) if t >= 0}
    out = torch.zeros(layout.n_seqs, h.shape[-1], dtype=h.dtype, device=h.device)
    for j, end in enumerate(layout.seq_offsets[1:]):  # packed index of each last token: end - 1
        if end - 1 in where:
            out[j] = h[where[end - 1]]
    if pg.cp > 1:
        dist.all_reduce(out, group=pg.cp_group)  # exactly one rank contributes each row
    return out


def _broadcast_tokens(
    tokens: torch.Tensor | None, b: int, pg: ParallelGroups, device: torch.device
) -> torch.Tensor:
    """Sampled tokens from the last stage to every stage of this pipeline."""
    if pg.pp == 1:
        return tokens
    buf = tokens if tokens is not None else torch.empty(b, dtype=torch.long, device=device)
    dist.broadcast(buf, src=pg.pp_ranks[-1], group=pg.pp_group)
    return buf


def _choose_variant(
    variant: str, cfg, pg: ParallelGroups, dtype: torch.dtype, new: int, cached: int, hardware
) -> str:
    """The prefill variant: as given, or by Alg. 1 for ``"auto"``; logged either way."""
    how = "given"
    if variant == "auto":
        variant = choose_variant(
            new, cached, cp=pg.cp, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
            bytes_per_element=dtype.itemsize, hardware=hardware, tp=pg.tp,
        )  # fmt: skip
        how = "Alg. 1"
    logger.info(
        "prefill of %d new tokens over %d cached (miss rate %.3f) at cp=%d: %s (%s)",
        new, cached, new / (new + cached), pg.cp, variant, how,
    )  # fmt: skip
    return variant


@dataclass
class Conversation:
    """What a batch of chats keeps between turns: the tokens so far and the CP-sharded KV cache.

    Pass the same object to :func:`generate` turn after turn (on every rank); each turn's
    prompts are appended to the history and prefilled over the cached prefix (persistent-KV
    prefill, paper §3.3), so earlier turns are never recomputed.

    Attributes:
        history: every sequence's tokens so far (prompts and generations).
        uncached: tail of each history not yet in the cache (the last generated token, which
            never went through the model); it leads the next turn's new tokens.
        decode_steps: decode tokens cached so far per sequence (continues the round-robin).
        cache: this rank's KV cache (None before the first turn).
    """

    history: list[list[int]] = field(default_factory=list)
    uncached: list[list[int]] = field(default_factory=list)
    decode_steps: list[int] = field(default_factory=list)
    cache: KVCache | None = None

    @property
    def cached_lens(self) -> list[int]:
        """Tokens of each sequence in the cache, over all CP ranks."""
        return [len(h) - len(u) for h, u in zip(self.history, self.uncached, strict=True)]


def _cache_lens_table(cache: KVCache, pg: ParallelGroups) -> list[list[int]]:
    """(cp, B) cached tokens per CP rank and sequence, known on every rank."""
    mine = torch.tensor(cache.lens, dtype=torch.long, device=cache.device)
    if pg.cp == 1:
        return [mine.tolist()]
    rows = [torch.empty_like(mine) for _ in range(pg.cp)]
    dist.all_gather(rows, mine, group=pg.cp_group)
    return [r.tolist() for r in rows]


def _decode_owned(seq: int, start: int, n: int, cp: int, cp_rank: int) -> int:
    """Decode tokens ``start .. start+n-1`` of ``seq`` that land on ``cp_rank``."""
    return decode_tokens_owned(seq, start + n, cp, cp_rank) - decode_tokens_owned(
        seq, start, cp, cp_rank
    )


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
    """
    if variant not in (*VARIANTS, "auto"):
        raise ValueError(f"unknown variant {variant!r}; choose one of {[*VARIANTS, 'auto']}")
    cfg = model.cfg
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    conv = conversation if conversation is not None else Conversation()
    if conv.history and len(conv.history) != len(prompts):
        raise ValueError(
            f"the conversation has {len(conv.history)} sequences but {len(prompts)} prompts "
            "were given; pass one new prompt per sequence"
        )
    b, max_new = len(prompts), sampling.max_new_tokens
    if conv.history:
        cached, history, uncached, steps0 = (
            conv.cached_lens,
            conv.history,
            conv.uncached,
            conv.decode_steps,
        )
    else:  # a fresh batch: every sequence starts empty
        cached, history, uncached, steps0 = [0] * b, [[]] * b, [[]] * b, [0] * b
    check_prompts(prompts, cfg.vocab_size, max_new, cfg.max_seq_len, [len(x) for x in history])
    new = [u + p for u, p in zip(uncached, prompts, strict=True)]
    layout = ShardLayout([len(x) for x in new], pg.cp)
    attn_kernel = get_kernel(kernel, device)
    n_new = sum(len(x) for x in new)
    hardware = hardware or hardware_for(device)
    variant = _choose_variant(variant, cfg, pg, dtype, n_new, sum(cached), hardware)
    extra = [
        layout.valid_kv_len(j, pg.cp_rank) + _decode_owned(j, steps0[j], max_new, pg.cp, pg.cp_rank)
        for j in range(b)
    ]
    if conv.cache is None:
        n_kv = next(iter(model.layers.values())).attention.n_local_kv_heads
        conv.cache = KVCache(list(model.layer_ids), extra, n_kv, cfg.head_dim, dtype, device)
    else:
        for j in range(b):
            conv.cache.reserve(j, extra[j])
    cache = conv.cache
    prefix_lens = _cache_lens_table(cache, pg) if any(cached) else None
    run = _Pipeline(model, pg, cfg.dim, dtype, device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)

    # -- prefill (over the cached prefix, if any) -------------------------------------------
    t_start = time.perf_counter()
    # token and position bookkeeping is host-side index math; the results go to the device
    packed = torch.tensor([t for x in new for t in x], dtype=torch.long, device="cpu")
    tokens = shard(packed, layout, pg.cp_rank).to(device)
    offsets = torch.repeat_interleave(
        torch.tensor(cached, device="cpu"), torch.tensor(layout.local_lens, device="cpu")
    )
    bar = tqdm(
        total=len(model.layer_ids), desc=f"prefill {n_new} tokens", unit="layer",
        delay=1.0, leave=False, disable=not progress,
    )  # fmt: skip
    ctx = ForwardContext(
        positions=(layout.positions(pg.cp_rank) + offsets).to(device),
        attention=PrefillAttention(
            layout, pg.cp_rank, pg.cp_group, cache, variant=variant, kernel=attn_kernel,
            prefix_lens=prefix_lens,
        ),
        on_layer=bar.update,
    )  # fmt: skip
    with bar:
        h = run(tokens, ctx)
    cache.commit()
    first_logits = None
    next_tokens = None
    if h is not None:
        first_logits = model.logits(_last_token_hidden(h, layout, pg))
        next_tokens = sample(first_logits, sampling, generator)
    next_tokens = _broadcast_tokens(next_tokens, b, pg, device)
    ttft = time.perf_counter() - t_start

    # -- decode -----------------------------------------------------------------------------
    step_times: list[float] = []
    eos_ids = sampling.eos_ids
    out = [[] for _ in range(b)]
    done = [False] * b
    steps = list(steps0)  # decode tokens cached per sequence (the round-robin counter)
    cached_last = [False] * b  # whether each sequence's last generated token is in the cache
    start = [c + len(x) for c, x in zip(cached, new, strict=True)]  # position of token 0
    for step in range(max_new):
        live = [not d for d in done]  # sequences whose token this step belongs to them
        for j, t in enumerate(next_tokens.tolist()):
            if live[j]:
                out[j].append(t)
                cached_last[j] = False
                done[j] = t in eos_ids or len(out[j]) >= max_new
        if all(done) or step == max_new - 1:
            break
        t_step = time.perf_counter()
        # a finished sequence still rides along in the batch, but its tokens are not cached
        owners = [decode_owner(j, steps[j], pg.cp) if live[j] else -1 for j in range(b)]
        ctx = ForwardContext(
            positions=torch.tensor([start[j] + step for j in range(b)], device=device),
            attention=DecodeAttention(cache, owners, pg.cp_rank, pg.cp_group, attn_kernel),
        )
        h = run(next_tokens, ctx)
        cache.commit()
        for j in range(b):
            if live[j]:
                steps[j] += 1
                cached_last[j] = True
        next_tokens = sample(model.logits(h), sampling, generator) if h is not None else None
        next_tokens = _broadcast_tokens(next_tokens, b, pg, device)
        step_times.append(time.perf_counter() - t_step)

    conv.history = [h + p + o for h, p, o in zip(history, prompts, out, strict=True)]
    conv.uncached = [[] if c else [o[-1]] for o, c in zip(out, cached_last, strict=True)]
    conv.decode_steps = steps
    return GenerationResult(
        tokens=out,
        first_logits=first_logits,
        ttft_s=ttft,
        decode_step_s=step_times,
        prefill_variant=variant,
        prefill_tokens=n_new,
    )
