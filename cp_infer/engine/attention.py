"""The attention a model layer gets from the engine, for prefill and for decode.

Prefill: ring attention (pass-KV or pass-Q) over the load-balanced shards; the real tokens'
K/V go into this rank's cache.

Decode: KV-cache parallelism (Mnemosyne's KVP). Every CP rank runs the new tokens (one per
sequence) through the layers, so the query is already on every rank; the token's K/V is kept
only by its round-robin owner. Each rank attends the query to the part of the cache it holds,
and one all-gather of the (output, LSE) partials lets every rank merge them exactly. We use this
instead of batched pass-Q because a decode step moves only (B, H, D+1) floats per rank in a
single collective, where pass-Q needs N-1 SendRecv steps plus an All2All: at decode sizes
latency, not bandwidth, is what costs. Both are exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_infer.attention import ring_attention
from cp_infer.attention.kernels import AttentionKernel
from cp_infer.attention.merge import merge_partials
from cp_infer.engine.kv_cache import KVCache
from cp_infer.sharding import ShardLayout

__all__ = ["DecodeAttention", "PrefillAttention"]


class PrefillAttention:
    """Ring attention over the CP group; caches the real tokens' K/V.

    Args:
        prefix_lens: (cp, B) tokens each CP rank already caches per sequence (earlier turns of
            a conversation); they are attended as the ring's KV prefix.
    """

    def __init__(
        self,
        layout: ShardLayout,
        cp_rank: int,
        cp_group,
        cache: KVCache,
        *,
        variant: str,
        kernel: str | AttentionKernel,
        prefix_lens: list[list[int]] | None = None,
    ) -> None:
        self.layout, self.cp_rank, self.cp_group = layout, cp_rank, cp_group
        self.cache, self.variant, self.kernel = cache, variant, kernel
        self.prefix_lens = prefix_lens

    def __call__(self, q, k, v, layer_id: int) -> torch.Tensor:
        prefix = None
        if self.prefix_lens is not None:  # earlier turns, already in the cache
            prefix = self.cache.as_prefix(layer_id, self.prefix_lens)
        out, _ = ring_attention(
            q, k, v, self.layout, self.cp_group, variant=self.variant, kernel=self.kernel,
            prefix=prefix,
        )  # fmt: skip
        for j in range(self.layout.n_seqs):
            seg = self.layout.local_slice(j)
            n = self.layout.valid_kv_len(j, self.cp_rank)  # real tokens: a prefix of the segment
            self.cache.write(layer_id, j, k[:, seg][:, :n], v[:, seg][:, :n])
        return out


class DecodeAttention:
    """One new token per sequence; exact attention over the CP-sharded cache (KVP + LSE merge).

    Args:
        owners: per sequence, the CP rank that stores this step's token.
    """

    def __init__(
        self, cache: KVCache, owners: list[int], cp_rank: int, cp_group, kernel: AttentionKernel
    ) -> None:
        self.cache, self.owners, self.cp_rank = cache, owners, cp_rank
        self.cp_group, self.kernel = cp_group, kernel
        self.cp = dist.get_world_size(cp_group) if cp_group is not None else 1

    def __call__(self, q, k, v, layer_id: int) -> torch.Tensor:
        h, b, d = q.shape  # (H, B, D): token j is sequence j's new token
        partial = torch.zeros(h, b, d + 1, dtype=torch.float32, device=q.device)  # out, LSE
        partial[..., d] = float("-inf")
        for j in range(b):
            if self.owners[j] == self.cp_rank:
                self.cache.write(layer_id, j, k[:, j : j + 1], v[:, j : j + 1])
            kc, vc = self.cache.view(layer_id, j)
            if kc.shape[1] == 0:
                continue  # this rank holds nothing of sequence j yet
            out, lse = self.kernel(q[None, :, j : j + 1], kc[None], vc[None], False, None)
            partial[:, j, :d] = out[0, :, 0].float()
            partial[:, j, d] = lse[0, :, 0]
        if self.cp == 1:
            return partial[..., :d].to(q.dtype)
        parts = [torch.empty_like(partial) for _ in range(self.cp)]
        dist.all_gather(parts, partial, group=self.cp_group)
        out, _ = merge_partials([p[..., :d] for p in parts], [p[..., d] for p in parts])
        return out.to(q.dtype)
