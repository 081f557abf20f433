"""The attention a model layer gets from the engine, for prefill and for decode.

Prefill: ring attention (pass-KV or pass-Q) over the load-balanced shards; the real tokens'
K/V go into this rank's cache.

Decode: KV-cache parallelism (Mnemosyne's KVP). Every CP rank runs the new tokens (one per
sequence) through the layers, so the query is already on every rank; the token's K/V is kept
only by its round-robin owner. Each rank attends the query to the part of the cache it holds,
and one exchange of the (output, LSE) partials lets every rank merge them exactly. We use this
instead of batched pass-Q because a decode step moves only (B, H, D+1) floats per rank in a
single collective, where pass-Q needs N-1 SendRecv steps plus an All2All: at decode sizes
latency, not bandwidth, is what costs. Both are exact.
"""

from __future__ import annotations

import torch

from cp_infer.attention import ring_attention
from cp_infer.attention.comm import RingComm
from cp_infer.attention.kernels import AttentionKernel, torch_cpu_flash
from cp_infer.attention.merge import merge_into_, merge_partials
from cp_infer.collectives import Exchange
from cp_infer.engine.batch import StepBatch
from cp_infer.engine.kv_cache import KVCache

__all__ = ["DecodeAttention", "MixedAttention", "PrefillAttention"]


class PrefillAttention:
    """Ring attention over the CP group, over the cached prefix if there is one.

    The cache keeps the real tokens' K/V as the step's plan says (:meth:`KVCache.store`).

    Args:
        prefix_lens: (cp, B, segments) cached tokens per CP rank, sequence and cache segment
            (earlier turns of a conversation); None when nothing is cached. They are attended
            in place as the ring's KV prefix.
        store: hand the layer's K/V to the cache (False: the caller does).
    """

    def __init__(
        self,
        batch: StepBatch,
        cp_group,
        cache: KVCache,
        *,
        kernel: AttentionKernel,
        prefix_lens=None,
        store: bool = True,
    ) -> None:
        self.batch, self.cp_group, self.cache, self.kernel = batch, cp_group, cache, kernel
        self.prefix_lens, self.store = prefix_lens, store
        if batch.placed and prefix_lens is not None:  # its cache is on its rank only
            self.prefix_lens = (prefix_lens[batch.rank],)

    def __call__(self, q, k, v, layer_id: int) -> torch.Tensor:
        prefix = None
        if self.prefix_lens is not None:  # earlier turns, read where the cache keeps them
            prefix = self.cache.prefix(layer_id, self.batch.seqs, self.prefix_lens)
        # a batch placed on this rank attends here alone (a ring of one: the same kernels and
        # merge, so its results are the ring's whatever the placement)
        placed = {"comm": RingComm.alone()} if self.batch.placed else {}
        out, _ = ring_attention(
            q, k, v, self.batch.layout, None if placed else self.cp_group,
            variant=self.batch.variant, kernel=self.kernel, prefix=prefix,
            kv_dtype=self.cache.kv_dtype, **placed,
        )  # fmt: skip
        if self.store:
            self.cache.store(layer_id, k, v)
        return out


class DecodeAttention:
    """One new token per sequence; exact attention over the CP-sharded cache (KVP + LSE merge).

    Every CP rank attends each query to the cache segments it holds and shares its
    (output, LSE) partials in one exchange per layer (:mod:`cp_infer.collectives`).

    Args:
        exchange: the CP group's exchange; None at cp=1.
        store: hand the layer's K/V to the cache first (False: the caller already did).
    """

    def __init__(
        self, batch: StepBatch, cache: KVCache, exchange: Exchange | None,
        kernel: AttentionKernel, *, store: bool = True,
    ) -> None:  # fmt: skip
        self.batch, self.cache, self.exchange, self.kernel = batch, cache, exchange, kernel
        self.store = store
        self._packing: tuple | None = None

    def __call__(self, q, k, v, layer_id: int) -> torch.Tensor:
        h, b, d = q.shape  # (H, B, D): token j is sequence j's new token
        if self.store:
            self.cache.store(layer_id, k, v)  # the tokens this rank owns this step
        partial = torch.zeros(h, b, d + 1, dtype=torch.float32, device=q.device)  # out, LSE
        partial[..., d] = float("-inf")
        if self._packing is None:  # the same every layer: the step's slots are planned
            rows, index, mask = [], None, None
            if self.kernel is torch_cpu_flash and q.device.type == "cpu":
                rows, index, mask = pack_decode(self.cache, self.batch.seqs, k.shape[0] * d)
            rest = sorted(set(range(b)) - set(rows))
            self._packing = rows, index, mask, rest
        rows, index, mask, rest = self._packing
        if rows:
            kc, vc = self.cache.gather(layer_id, index)
            shape = (kc.shape[0], len(rows), -1, d)
            out, lse = packed_attention(q[:, rows], kc.view(shape), vc.view(shape), mask)
            partial[:, rows, :d], partial[:, rows, d] = out.float(), lse
        for j in rest:
            out_j, lse_j = partial[:, j, :d], partial[:, j, d]
            for i, (kc, vc) in enumerate(self.cache.blocks(layer_id, self.batch.seqs[j])):
                out, lse = self.kernel(q[None, :, j : j + 1], kc[None], vc[None], False, None)
                if i == 0:
                    out_j.copy_(out[0, :, 0])
                    lse_j.copy_(lse[0, :, 0])
                else:
                    merge_into_(out_j[:, None], lse_j[:, None], out[0], lse[0])
        if self.exchange is None:
            return partial[..., :d].to(q.dtype)
        parts = self.exchange.all_gather(partial)
        out, _ = merge_partials([p[..., :d] for p in parts], [p[..., d] for p in parts])
        return out.to(q.dtype)


#: With the CPU flash kernel, decode attention packs the short caches of a step into one padded
#: batch per layer: one masked kernel call instead of one per sequence and run of slots (about
#: 30 calls made most of a 3-sequence step's attention: docs/performance.md), while the packed
#: K holds at most this many elements (and V as many). Longer caches are attended where they
#: lie, run by run.
PACKED_DECODE_ELEMENTS = 1 << 21


def pack_decode(
    cache: KVCache, seqs: tuple[int, ...], token_elements: int
) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """Which of a decode step's sequences are attended packed, and how (see
    :data:`PACKED_DECODE_ELEMENTS`): their rows in the batch, the (B' * L,) cache slots of
    their tokens on this rank (each padded to L with slot 0) and the (B', L) additive mask of
    the padding (-inf). The shortest caches are packed first; ``token_elements`` are one
    token's K elements over the heads. A sequence with no token here is never packed (the
    kernel gives a row that sees no key an LSE of 0, not -inf)."""
    runs = [cache.ledger.runs(seq, staged=True) for seq in seqs]
    lens = [sum(n for _, n in r) for r in runs]  # (the slots are listed only for those packed)
    rows: list[int] = []
    for j in sorted((j for j in range(len(seqs)) if lens[j]), key=lambda j: lens[j]):
        if (len(rows) + 1) * lens[j] * token_elements > PACKED_DECODE_ELEMENTS:
            break
        rows.append(j)
    if not rows:
        return [], None, None
    rows.sort()
    width = max(lens[j] for j in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long, device="cpu")  # built on the host
    mask = torch.full((len(rows), width), float("-inf"), dtype=cache.dtype, device="cpu")
    for i, j in enumerate(rows):
        index[i, : lens[j]] = torch.cat(
            [torch.arange(s, s + n, dtype=torch.long, device="cpu") for s, n in runs[j]]
        )
        mask[i, : lens[j]] = 0.0
    return rows, index.view(-1).to(cache.device), mask.to(cache.device)


def packed_attention(q, k, v, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of one query per sequence over its padded keys (CPU flash kernel).

    Args:
        q: (H, B, D) the sequences' queries.
        k, v: (H_kv, B, L, D) their keys and values (GQA: query head h reads K/V head
            h // (H / H_kv), as the G query heads of a K/V head are folded into its rows).
        mask: (B, L) 0 for a key, -inf for padding; every row has a key.

    Returns:
        (H, B, D) output in q's dtype and (H, B) float32 LSE.
    """
    h, b, d = q.shape
    h_kv = k.shape[0]
    qf = q.view(h_kv, h // h_kv, b, d).permute(2, 0, 1, 3).contiguous()  # (B, H_kv, G, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qf, k.transpose(0, 1), v.transpose(0, 1), 0.0, False, attn_mask=mask[:, None, None, :]
    )[:2]
    return out.permute(1, 2, 0, 3).reshape(h, b, d), lse.permute(1, 2, 0).reshape(h, b).float()


class MixedAttention:
    """Several batches in one forward pass (Sarathi's and Mnemosyne's mixed batch, and the
    rows placed on single CP ranks beside the ring's): the layers' GEMMs run once over all,
    and attention splits them.

    The pass's tokens are each batch's on this rank, one after another (``sizes`` of them:
    a prefill's local shard, a decode's rows). The cache keeps them all as the pass's plan
    says, stored before any attends, so each decode token sees its own K/V; a prefill reads
    only the committed prefix, so what this pass stages does not change it.
    """

    def __init__(self, parts: list, sizes: list[int], cache: KVCache) -> None:
        assert not any(p.store for p in parts), "the mixed pass stores for all"
        self.parts, self.sizes, self.cache = parts, sizes, cache

    def __call__(self, q, k, v, layer_id: int) -> torch.Tensor:
        self.cache.store(layer_id, k, v)
        out, at = [], 0
        for part, n in zip(self.parts, self.sizes, strict=True):
            out.append(part(q[:, at : at + n], k[:, at : at + n], v[:, at : at + n], layer_id))
            at += n
        return torch.cat(out, dim=1)
