"""The model runner: one step of this rank's pipeline stage on a :class:`StepBatch`.

It owns what lives as long as the model: the KV cache, the kernel, and the CP group's decode
exchange. :meth:`ModelRunner.step` runs one forward pass of a batch on this rank (receiving the
previous stage's hidden states and sending its own to the next stage), lets the cache keep what
the batch's plan says, and on the last stage returns the logits of every sequence's next token.
Sampling is the caller's; :meth:`ModelRunner.share` hands the sampled tokens to every stage so
that all ranks feed the same next step::

    runner = ModelRunner(model, pg)
    out = runner.step(batch)                       # out.logits: (B, V) on the last stage
    tokens = sample(out.logits) if out.logits is not None else None
    tokens = runner.share(tokens, (batch.n_seqs,), torch.long)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from cp_infer.attention import VARIANTS
from cp_infer.attention.kernels import get_kernel
from cp_infer.collectives import Exchange, make_exchange
from cp_infer.engine.attention import DecodeAttention, MixedAttention, PrefillAttention
from cp_infer.engine.batch import StepBatch
from cp_infer.engine.kv_cache import DEFAULT_BLOCK_SIZE, KVCache
from cp_infer.engine.kv_pool import KVPool
from cp_infer.engine.sampling import logprobs_of
from cp_infer.engine.sizing import kv_element_bytes, token_bytes
from cp_infer.hardware import Profile, faster_variant, hardware_for
from cp_infer.models.llama import ForwardContext, TokenSplit, Transformer
from cp_infer.parallel.pipeline import recv_activation, send_activation
from cp_infer.sharding import unshard
from parallel_state import ParallelGroups

__all__ = ["ModelRunner", "StepOutput"]

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step produced on this rank (everything is None off the last pipeline stage).

    Attributes:
        logits: (B, V) float32 logits of each sequence's next token (a mixed step: of its
            prefill's sequences).
        decode_logits: a mixed step's decode rows (:meth:`ModelRunner.step_mixed`).
        prompt_logprobs: with ``prompt_logprobs``, per sequence, each new token's
            log-probability given those before it.
        prompt_top_logprobs: with ``prompt_top``, per sequence and position, the (id,
            log-probability) of the most likely tokens.
    """

    logits: torch.Tensor | None = field(default=None, repr=False)
    decode_logits: torch.Tensor | None = field(default=None, repr=False)
    prompt_logprobs: list[list[float]] | None = None
    prompt_top_logprobs: list[list[list[tuple[int, float]]]] | None = None


class ModelRunner:
    """Runs steps of this rank's shard of the model; owns its KV cache.

    Args:
        model: this rank's shard (:func:`cp_infer.parallel.parallelize`).
        pg: the parallel layout.
        kernel: local attention kernel name (``"auto"`` picks by the model's device).
        exchange: how decode shares attention partials over CP (:data:`~cp_infer.collectives.
            EXCHANGES`); ``"auto"`` is shared memory on one CPU host, else the group's
            all_gather.
        hardware: the hardware model (:mod:`cp_infer.hardware`) Alg. 1 and the chunk sizing
            weigh; default: the built-in profile of the model's device (:func:`hardware_for`).
        timeout_s: how long a shared-memory exchange waits for a peer.
        kv_dtype: ``"fp8_e4m3"``: the cache holds K/V in FP8 and pass-KV sends them so.
        kv_memory: bytes of this rank's KV pool (blocks of every layer of its stage, FP8
            scales included), allocated once; the ranks agree on the smallest block count any
            of them gets.
        kv_tokens: instead of ``kv_memory``, the pool's token slots per rank. Default (neither
            given): room for one sequence of the model's ``max_seq_len``.
        kv_block_size: token slots per block of the pool.
    """

    def __init__(
        self,
        model: Transformer,
        pg: ParallelGroups,
        *,
        kernel: str = "auto",
        exchange: str = "auto",
        hardware: Profile | None = None,
        timeout_s: float = 60.0,
        kv_dtype: str = "auto",
        kv_memory: int | None = None,
        kv_tokens: int | None = None,
        kv_block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.model, self.pg, self.cfg = model, pg, model.cfg
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.kernel = get_kernel(kernel, self.device)
        self.hardware = hardware or hardware_for(self.device)
        n_kv = next(iter(model.layers.values())).attention.n_local_kv_heads
        n_blocks = self._pool_blocks(kv_memory, kv_tokens, kv_block_size, n_kv, kv_dtype)
        self.cache = KVCache(
            model.layer_ids, n_kv, self.cfg.head_dim, self.dtype, self.device, kv_dtype=kv_dtype,
            pool=KVPool(n_blocks, kv_block_size, pg.cp), cp_rank=pg.cp_rank,
        )  # fmt: skip
        self.exchange_kind, self.timeout_s = exchange, timeout_s
        self._exchange: Exchange | None = None
        self._exchange_bytes = 0

    def _pool_blocks(
        self, kv_memory: int | None, kv_tokens: int | None, block_size: int, n_kv: int,
        kv_dtype: str,
    ) -> int:  # fmt: skip
        """Blocks of this rank's pool: what ``kv_memory`` holds, the smallest over all ranks
        (pipeline stages hold different numbers of layers; the books assume one count)."""
        if block_size < 1:
            raise ValueError(f"the KV block size must be >= 1 token, got {block_size}")
        if kv_memory is None:
            if kv_tokens is None:
                kv_tokens = -(-self.cfg.max_seq_len // self.pg.cp) + 2 * block_size
            n_blocks = -(-kv_tokens // block_size)
        else:
            per_block = block_size * token_bytes(
                len(self.model.layer_ids), n_kv, self.cfg.head_dim, self.dtype.itemsize, kv_dtype
            )
            n_blocks = kv_memory // per_block
            if dist.is_initialized() and dist.get_world_size() > 1:
                t = torch.tensor([n_blocks], dtype=torch.long, device=self.device)
                dist.all_reduce(t, op=dist.ReduceOp.MIN)
                n_blocks = int(t.item())
        if n_blocks < 1:
            raise ValueError(
                f"--kv-cache-memory {kv_memory} B holds no block of {block_size} tokens on some "
                "rank: raise --kv-cache-memory or lower --kv-block-size"
            )
        return n_blocks

    # -- choices ----------------------------------------------------------------------------
    def resolve_variant(self, variant: str, new: int, cached: int) -> str:
        """The prefill variant: as given, or for ``"auto"`` the one the hardware model says is
        faster (Alg. 1's comparison with all of the model's terms:
        :func:`cp_infer.hardware.faster_variant`); logged either way."""
        if variant not in (*VARIANTS, "auto"):
            raise ValueError(f"unknown variant {variant!r}; choose one of {[*VARIANTS, 'auto']}")
        how = "given"
        if variant == "auto":
            kv_bytes = kv_element_bytes(self.cache.kv_dtype, self.dtype.itemsize, self.cfg.head_dim)
            variant = faster_variant(
                self.cfg, self.hardware, cp=self.pg.cp, tp=self.pg.tp, new=new, cached=cached,
                bytes_per_element=self.dtype.itemsize, kv_bytes=kv_bytes,
            )  # fmt: skip
            how = "hardware model"
        logger.info(
            "prefill of %d new tokens over %d cached (miss rate %.3f) at cp=%d: %s (%s)",
            new, cached, new / (new + cached), self.pg.cp, variant, how,
        )  # fmt: skip
        return variant

    def _decode_exchange(self, n_bytes: int) -> Exchange | None:
        """The CP exchange, sized for at least ``n_bytes`` (rebuilt alike on every CP rank:
        the batch, hence the size, is the same on all of them). Decode's partials go through
        it, and a prefill's small per-step gathers (the cache's lengths, the last tokens'
        hidden states): on one host it is shared memory, much quicker than a collective."""
        if self.pg.cp == 1:
            return None
        if self._exchange is None or n_bytes > self._exchange_bytes:
            self._exchange_bytes = max(n_bytes, 2 * self._exchange_bytes)
            self._exchange = make_exchange(
                self.exchange_kind, self.pg.cp_group, device=self.device,
                max_bytes=self._exchange_bytes, timeout_s=self.timeout_s,
            )  # fmt: skip
            logger.debug("decode exchange over CP: %s", type(self._exchange).__name__)
        return self._exchange

    # -- one step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self, batch: StepBatch, *, progress: bool = False, prompt_logprobs: bool = False,
        prompt_top: int = 0, after_layer: Callable[[StepBatch, int], None] | None = None,
    ) -> StepOutput:  # fmt: skip
        """Run ``batch`` through this rank's stage; (B, V) float32 logits on the last stage.

        Args:
            progress: show a per-layer progress bar on a prefill that takes over a second.
            prompt_logprobs: a prefill also returns, on the last stage, every new token's
                log-probability given those before it.
            prompt_top: with ``prompt_logprobs``, also the ``prompt_top`` most likely tokens
                at each position.
            after_layer: a prefill calls ``after_layer(batch, layer id)`` after each layer,
                its K/V stored (staged) by then (a prefill tier streams them to the decode
                tier).
        """
        pg = self.pg
        self.cache.plan(batch.all_store_plans)
        token_split, split_tokens_pays = None, True
        if batch.kind == "prefill":
            attention = PrefillAttention(
                batch, pg.cp_group, self.cache, kernel=self.kernel,
                prefix_lens=self._prefix_lens(batch) if batch.n_cached else None,
            )  # fmt: skip
        elif batch.placed:  # this rank's own decodes: local attention, no exchange
            attention = DecodeAttention(batch, self.cache, None, self.kernel)
        else:
            n_local_heads = next(iter(self.model.layers.values())).attention.n_local_heads
            partials = 4 * n_local_heads * batch.n_seqs * (self.cfg.head_dim + 1)
            # what a CP rank gathers of the FFN and the head: a share of the weights' outputs
            # for every token (vocabulary rows: at most the padded vocabulary's share), or
            # (FP8 layers) the outputs of a share of the tokens
            width = self.cfg.dim * self.dtype.itemsize
            per = -(-batch.n_seqs // pg.cp)
            shares = max(batch.n_seqs * max(width, 4 * -(-(self.cfg.vocab_size + 128) // pg.cp)),
                         per * max(width, 4 * self.cfg.vocab_size))  # fmt: skip
            exchange = self._decode_exchange(max(partials, shares))
            attention = DecodeAttention(batch, self.cache, exchange, self.kernel)
            if exchange is not None:
                # the tokens are on every CP rank: each runs a share of the FFN's hidden
                # features and of the head's vocabulary (of the tokens, through the experts),
                # and the shares are gathered
                token_split = TokenSplit(pg.cp_rank, pg.cp, exchange.all_gather)
                split_tokens_pays = batch.n_seqs >= pg.cp or (self.cfg.is_moe and pg.ep > 1)
        bar = tqdm(
            total=len(self.model.layer_ids), desc=f"prefill {batch.n_tokens} tokens",
            unit="layer", delay=1.0, leave=False,
            disable=not (progress and batch.kind == "prefill"),
        )  # fmt: skip
        on_layer = bar.update
        if after_layer is not None and batch.kind == "prefill":
            layers, hook = iter(self.model.layer_ids), after_layer

            def on_layer() -> None:
                bar.update()
                hook(batch, next(layers))

        ctx = ForwardContext(
            positions=batch.positions(pg.cp_rank),
            attention=attention,
            on_layer=on_layer,
            token_split=token_split,
            split_tokens=split_tokens_pays,
        )
        try:
            with bar:
                h = self._stage(batch.local_tokens(pg.cp_rank), ctx)
        except BaseException:
            self.cache.abort()  # a failed pass leaves the cache as it was
            raise
        self.cache.commit()
        if h is None:
            return StepOutput()
        out = StepOutput()
        if batch.kind == "prefill":
            if prompt_logprobs:
                out = self._prompt_logprobs(h, batch, prompt_top)
            h = self._last_token_hidden(h, batch)
        out.logits = self.model.logits(h, token_split)
        return out

    @torch.no_grad()
    def step_mixed(
        self, prefill: StepBatch, decode: StepBatch, *, prompt_logprobs: bool = False,
        prompt_top: int = 0,
    ) -> StepOutput:  # fmt: skip
        """A prefill batch and a decode batch (other sequences) in one forward pass: the layers'
        GEMMs run once over both, attention is each batch's own (the ring, KVP).

        Returns:
            the prefill's output, with the decode rows' logits in ``decode_logits``.
        """
        assert prefill.kind == "prefill" and decode.kind == "decode"
        assert not set(prefill.seqs) & set(decode.seqs), "a sequence is in one of the two"
        assert prefill.rank == decode.rank, "both on the ring, or both on this rank"
        pg = self.pg
        if self.cfg.is_moe and pg.ep > 1 and pg.cp > 1 and not prefill.placed:
            # decode routes each token from one CP rank only (TokenSplit), prefill from its
            # shard's: two passes
            out = self.step(prefill, prompt_logprobs=prompt_logprobs, prompt_top=prompt_top)
            out.decode_logits = self.step(decode).logits
            return out
        prompt = {0: prompt_top} if prompt_logprobs else {}
        out, dec = self.step_many([prefill, decode], prompt=prompt)
        out.decode_logits = dec.logits
        return out

    @torch.no_grad()
    def step_many(
        self, batches: list[StepBatch], *, prompt: dict[int, int] | None = None
    ) -> list[StepOutput]:
        """Several batches of different sequences in one forward pass on this rank: the
        layers' GEMMs run once over all of their tokens, and attention is each batch's own
        (the ring's prefill and KVP decode over the CP group, a placed batch's on this rank
        alone). The ring's batches must come first and be in every CP rank's list alike (their
        collectives run in the same order everywhere); the batches placed on this rank follow.

        Args:
            prompt: batch index -> alternatives: those prefill batches also return their
                prompt tokens' log-probabilities, with that many alternatives each.

        Returns:
            each batch's output (its rows' logits, and prompt log-probabilities; empty off the
            last pipeline stage).
        """
        pg, prompt = self.pg, prompt or {}
        assert len({s for b in batches for s in b.seqs}) == sum(b.n_seqs for b in batches)
        assert all(b.rank in (None, pg.cp_rank) for b in batches), "this rank's batches only"
        sizes, offsets, plans = self._stacked(batches)
        self.cache.plan(plans)
        n_local_heads = next(iter(self.model.layers.values())).attention.n_local_heads
        parts = []
        for b in batches:
            if b.kind == "prefill":
                parts.append(PrefillAttention(
                    b, pg.cp_group, self.cache, kernel=self.kernel, store=False,
                    prefix_lens=self._prefix_lens(b) if b.n_cached else None,
                ))  # fmt: skip
                continue
            exchange = None
            if not b.placed:
                exchange = self._decode_exchange(
                    4 * n_local_heads * b.n_seqs * (self.cfg.head_dim + 1)
                )
            parts.append(DecodeAttention(b, self.cache, exchange, self.kernel, store=False))
        ctx = ForwardContext(
            positions=torch.cat([b.positions(pg.cp_rank) for b in batches]),
            attention=MixedAttention(parts, sizes, self.cache),
        )
        tokens = torch.cat([b.local_tokens(pg.cp_rank) for b in batches])
        try:
            h = self._stage(tokens, ctx)
        except BaseException:
            self.cache.abort()
            raise
        self.cache.commit()
        if h is None:
            return [StepOutput() for _ in batches]
        outs, rows = [], []
        for i, (b, at, n) in enumerate(zip(batches, offsets, sizes, strict=True)):
            mine = h[at : at + n]
            out = StepOutput()
            if b.kind == "prefill":
                if i in prompt:
                    out = self._prompt_logprobs(mine, b, prompt[i])
                mine = self._last_token_hidden(mine, b)
            outs.append(out)
            rows.append(mine)
        # one LM head pass over every row: its weight is read once (it can be the largest
        # GEMM of a step of a few rows, and CPU GEMMs of a few rows read their weight per row)
        logits = self.model.logits(torch.cat(rows))
        at = 0
        for out, r in zip(outs, rows, strict=True):
            out.logits = logits[at : at + r.shape[0]]
            at += r.shape[0]
        return outs

    def keep_books(self, prefill: StepBatch | None, decode: StepBatch | None) -> None:
        """A pass placed on another CP rank: its tokens go into that rank's books here, as the
        pass (:meth:`step_many`) lays them out there, and nothing runs."""
        self.cache.plan(self._stacked([b for b in (prefill, decode) if b is not None])[2])
        self.cache.commit()

    def _stacked(self, batches: list[StepBatch]) -> tuple[list[int], list[int], list[list]]:
        """Batches one after another in one pass: each one's tokens on a rank (a prefill's
        shard, a decode's rows), where each starts, and every CP rank's store plans for all."""
        sizes = [b.layout.t_local if b.kind == "prefill" else b.n_seqs for b in batches]
        offsets = [sum(sizes[:i]) for i in range(len(batches))]
        plans: list[list] = [[] for _ in range(self.pg.cp)]
        for b, at in zip(batches, offsets, strict=True):
            for r, mine in enumerate(b.all_store_plans):
                plans[r] += [replace(p, start=p.start + at) for p in mine]
        return sizes, offsets, plans

    def _prompt_logprobs(self, h: torch.Tensor, batch: StepBatch, top: int = 0) -> StepOutput:
        """Per sequence, the log-probability of each new token after the first, given the
        ones before it (Megatron's ``logprobs``), on every rank of the last stage; with
        ``top``, the ``top`` most likely tokens at each of those positions."""
        pg = self.pg
        flat = torch.tensor([t for seq in batch.tokens for t in seq], dtype=torch.long)
        index = batch.layout.gather_index(0 if batch.placed else pg.cp_rank)  # packed index
        ends = torch.tensor(batch.layout.seq_offsets[1:])
        # a token predicts the next one of its sequence; the last (and padding) predict nothing
        has_next = (index >= 0) & ~torch.isin(index + 1, ends)
        target = torch.where(has_next, flat[(index + 1).clamp(max=len(flat) - 1)], 0)
        mine = torch.full((h.shape[0],), float("nan"), dtype=torch.float64)
        top_lp = torch.zeros((h.shape[0], top), dtype=torch.float64)
        top_id = torch.zeros((h.shape[0], top), dtype=torch.long)
        for lo in range(0, h.shape[0], 1024):  # chunks: (T, V) logits at once can be huge
            hi = min(lo + 1024, h.shape[0])
            logits = self.model.logits(h[lo:hi])
            chosen, values, ids = logprobs_of(logits, target[lo:hi].to(logits.device), top)
            mine[lo:hi], top_lp[lo:hi], top_id[lo:hi] = chosen.cpu(), values.cpu(), ids.cpu()
        mine[~has_next] = float("nan")
        per_seq = list(zip(batch.layout.seq_offsets, batch.layout.seq_offsets[1:], strict=False))
        packed = self._gather_tokens(mine, batch)
        out = StepOutput(prompt_logprobs=[packed[a : b - 1].tolist() for a, b in per_seq])
        if top:
            lp, ids = self._gather_tokens(top_lp, batch), self._gather_tokens(top_id, batch)
            out.prompt_top_logprobs = [
                [list(zip(i, v, strict=True)) for i, v in zip(ids[a : b - 1].tolist(),
                                                              lp[a : b - 1].tolist(), strict=True)]
                for a, b in per_seq
            ]  # fmt: skip
        return out

    def _gather_tokens(self, mine: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Per-token values of this CP rank's shard -> the whole packed batch's, on the CPU."""
        parts = [mine]
        if self.pg.cp > 1 and not batch.placed:
            parts = [torch.empty_like(mine, device=self.device) for _ in range(self.pg.cp)]
            dist.all_gather(parts, mine.to(self.device), group=self.pg.cp_group)
            parts = [x.cpu() for x in parts]
        return unshard(parts, batch.layout)

    def share(self, values: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        """A tensor the last stage computed, on every stage of this pipeline."""
        if self.pg.pp == 1:
            return values
        buf = values if values is not None else torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(buf, src=self.pg.pp_ranks[-1], group=self.pg.pp_group)
        return buf

    def share_logprobs(
        self, logits: torch.Tensor | None, tokens: torch.Tensor | None, k: int, n: int
    ) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Each of the ``n`` rows' log-probability of its sampled token and its ``k`` most
        likely tokens (:func:`~cp_infer.engine.sampling.logprobs_of`), computed from the last
        stage's ``logits`` and shared along the pipeline: (chosen, [(id, logprob)]) per row."""
        chosen = values = ids = None
        if logits is not None:
            chosen, values, ids = logprobs_of(logits, tokens, k)
        chosen = self.share(chosen, (n,), torch.float64).tolist()
        if not k:
            return chosen, [[] for _ in range(n)]
        values = self.share(values, (n, k), torch.float64).tolist()
        ids = self.share(ids, (n, k), torch.long).tolist()
        return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]

    def share_object(self, obj):
        """A picklable object the last stage holds, on every stage of this pipeline."""
        if self.pg.pp == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.pg.pp_ranks[-1], group=self.pg.pp_group)
        return box[0]

    # -- pieces -----------------------------------------------------------------------------
    def _stage(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """This stage's layers, with the hand-off from the previous stage and to the next."""
        pg = self.pg
        x = tokens
        if not pg.is_first_pp_stage:
            shape = (tokens.shape[0], self.cfg.dim)
            x = recv_activation(
                shape, self.dtype, pg.pp_ranks[pg.pp_rank - 1], pg.pp_group, self.device
            )
        h = self.model(x, ctx)
        if not pg.is_last_pp_stage:
            send_activation(h, pg.pp_ranks[pg.pp_rank + 1], pg.pp_group)
            return None
        return h

    def _prefix_lens(self, batch: StepBatch):
        """(cp, B, runs) cached tokens per CP rank, sequence and run (from the books every
        rank keeps: no exchange)."""
        return self.cache.lens(batch.seqs)

    def _last_token_hidden(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """(B, dim) hidden state of each sequence's last new token, on every CP rank."""
        out = torch.zeros(batch.n_seqs, h.shape[-1], dtype=h.dtype, device=h.device)
        for j, i in batch.last_tokens(self.pg.cp_rank):
            out[j] = h[i]
        if self.pg.cp > 1 and not batch.placed:  # one rank contributes each row: a sum
            parts = self._decode_exchange(out.numel() * out.element_size()).all_gather(out)
            out = torch.stack(parts).sum(0)
        return out
