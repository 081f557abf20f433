"""Unsharded attention over a packed variable-length batch: the oracle for ring attention."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate, pairwise

import torch

from cp_infer.attention.kernels import AttentionKernel, get_kernel

__all__ = ["varlen_attention"]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: Sequence[int],
    *,
    causal: bool = True,
    kernel: str | AttentionKernel = "auto",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence of a packed batch over itself, on one process.

    Args:
        q: (H, T, D), ``T = sum(seq_lens)``; k, v: (H_kv, T, D).

    Returns:
        (out, lse): (H, T, D) in q's dtype, (H, T) float32.
    """
    kernel = get_kernel(kernel, q.device)
    outs, lses = [], []
    offsets = (0, *accumulate(seq_lens))
    for s, e in pairwise(offsets):
        o, lse = kernel(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], causal, scale)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
