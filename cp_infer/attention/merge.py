"""Exact merge of partial attention results by their log-sum-exp (paper §3.3).

Attention of a query row over a key set split into parts i, each giving (O_i, LSE_i), is

    LSE = log(sum_i exp(LSE_i))
    O   = sum_i exp(LSE_i - LSE) * O_i

All arithmetic is float32. A part that saw no key has LSE_i = -inf and weight 0; a row that saw
no key at all keeps LSE = -inf and O = 0 instead of NaN (the guard below). pass-KV, pass-Q,
decode and KV-cache parallelism all merge through these two functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["merge_into_", "merge_partials"]


def _safe(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf replaced by 0, so ``exp(-inf - safe) = 0`` rather than NaN."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def merge_into_(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Fold one partial result into a running one, in place.

    Args:
        acc_out: (..., T, D) float32 running output (may be a view into a larger buffer).
        acc_lse: (..., T) float32 running LSE; -inf where nothing was merged yet.
        out: (..., T, D) partial output, any float dtype.
        lse: (..., T) partial LSE.
    """
    lse = lse.float()
    new_lse = torch.logaddexp(acc_lse, lse)
    safe = _safe(new_lse)
    acc_out.mul_(torch.exp(acc_lse - safe).unsqueeze(-1))
    acc_out.addcmul_(out, torch.exp(lse - safe).unsqueeze(-1))
    acc_lse.copy_(new_lse)


def merge_partials(
    outs: Sequence[torch.Tensor] | torch.Tensor, lses: Sequence[torch.Tensor] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial results at once.

    Args:
        outs: N tensors (..., T, D), or one stacked (N, ..., T, D).
        lses: N tensors (..., T), or one stacked (N, ..., T).

    Returns:
        (out, lse): float32 (..., T, D) and (..., T).
    """
    outs = torch.stack(list(outs)) if not isinstance(outs, torch.Tensor) else outs
    lses = torch.stack(list(lses)) if not isinstance(lses, torch.Tensor) else lses
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - _safe(lse).unsqueeze(0))  # (N, ..., T); 0 where LSE_i = -inf
    out = (outs.float() * weights.unsqueeze(-1)).sum(dim=0)
    return out, lse
