"""Exact context-parallel attention: local kernels, LSE merge, pass-KV and pass-Q rings."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from cp_infer.attention.blocks import KVPrefix, attend_step
from cp_infer.attention.causal import BlockCall, ChunkRelation, chunk_relation, plan_block
from cp_infer.attention.comm import CommStats, RingComm
from cp_infer.attention.kernels import KERNELS, AttentionKernel, get_kernel
from cp_infer.attention.merge import merge_into_, merge_partials
from cp_infer.attention.pass_kv import ring_attention_pass_kv
from cp_infer.attention.pass_q import ring_attention_pass_q
from cp_infer.attention.reference import varlen_attention
from cp_infer.sharding import ShardLayout

Variant = Literal["pass-kv", "pass-q"]
VARIANTS: tuple[Variant, ...] = ("pass-kv", "pass-q")

__all__ = [
    "KERNELS",
    "VARIANTS",
    "AttentionKernel",
    "BlockCall",
    "ChunkRelation",
    "CommStats",
    "KVPrefix",
    "RingComm",
    "Variant",
    "attend_step",
    "chunk_relation",
    "get_kernel",
    "merge_into_",
    "merge_partials",
    "plan_block",
    "ring_attention",
    "ring_attention_pass_kv",
    "ring_attention_pass_q",
    "varlen_attention",
]


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ShardLayout,
    group: dist.ProcessGroup | None = None,
    *,
    variant: Variant = "pass-kv",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention by name of variant; see :func:`ring_attention_pass_kv` for arguments."""
    if variant == "pass-kv":
        return ring_attention_pass_kv(q, k, v, layout, group, **kwargs)
    if variant == "pass-q":
        return ring_attention_pass_q(q, k, v, layout, group, **kwargs)
    raise ValueError(f"unknown ring attention variant {variant!r}; choose one of {VARIANTS}")
