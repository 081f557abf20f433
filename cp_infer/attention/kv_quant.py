"""FP8 keys and values: what the KV cache stores and pass-KV sends with ``--kv-dtype fp8_e4m3``.

Each (head, token) row of D values gets its own float32 scale (its largest magnitude over 448),
so one outlier token or head costs precision only in its own row. Quantized once, when the
token's K/V are computed; attention reads dequantized blocks, one at a time.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_KV", "KV_DTYPES", "dequantize_kv", "quantize_kv"]

FP8_KV = torch.float8_e4m3fn
_MAX = torch.finfo(FP8_KV).max
KV_DTYPES = ("auto", "fp8_e4m3")  # auto: the model's dtype


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, T, D) keys or values -> float8 values and a float32 (H, T) scale per (head, token)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / _MAX).clamp(min=1e-12)
    q = (xf / scale.unsqueeze(-1)).clamp(-_MAX, _MAX).to(FP8_KV)
    return q.contiguous(), scale.contiguous()  # contiguous: they go on the wire as they are


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`, in ``dtype``."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)
