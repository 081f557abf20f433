"""Local attention kernels that also return the log-sum-exp (LSE) of every query row.

Ring attention never imports a backend: it is handed a kernel with one signature,

    kernel(q, k, v, causal, scale) -> (out, lse)

    q     (B, H, Tq, D)
    k, v  (B, H_kv, Tk, D)     H % H_kv == 0; K/V heads are never repeated (GQA native)
    out   (B, H, Tq, D)        q's dtype
    lse   (B, H, Tq)           float32, natural log; -inf for a row that sees no key

``causal=True`` is only asked for on square blocks (Tq == Tk), where top-left and bottom-right
alignment agree. Backends are looked up by name with :func:`get_kernel`; GPU backends are imported
only when asked for, and raise an ImportError naming the extra to install.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

__all__ = ["KERNELS", "AttentionKernel", "get_kernel", "reference_attention", "torch_cpu_flash"]


class AttentionKernel(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    assert q.dim() == 4 and k.shape == v.shape, (q.shape, k.shape, v.shape)
    assert q.shape[1] % k.shape[1] == 0, f"H={q.shape[1]} not a multiple of H_kv={k.shape[1]}"
    assert not causal or q.shape[2] == k.shape[2], "causal blocks must be square"


FOLD_MAX_QUERIES = 16  # non-causal GQA blocks with at most this many queries are folded


def torch_cpu_flash(q, k, v, causal, scale=None):
    """PyTorch's CPU flash-attention kernel (exact, GQA native, returns LSE).

    A non-causal block of a few queries (decode, a small chunk against the cache) is *folded*:
    the G query heads that share a KV head become G x Tq queries of that one head, so each K/V
    tile is read once for all of them instead of once per query head (decode over 8K keys at
    8/2 heads: 1.7x faster). Every query row is computed alike either way.
    """
    _check_shapes(q, k, v, causal)
    # the aten kernel reads the head dim as contiguous (other strides give wrong results)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    b, h, tq, d = q.shape
    h_kv = k.shape[1]
    fold = not causal and h > h_kv and tq <= FOLD_MAX_QUERIES
    if fold:
        q = q.reshape(b, h_kv, (h // h_kv) * tq, d)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    if fold:
        out, lse = out.reshape(b, h, tq, d), lse.reshape(b, h, tq)
    return out, lse.float()


def reference_attention(q, k, v, causal, scale=None):
    """Plain PyTorch math in float32: the oracle the fast kernels are tested against.

    GQA by broadcasting query groups against K/V heads (no repeat). A row with no visible key
    gets out = 0 and lse = -inf.
    """
    _check_shapes(q, k, v, causal)
    b, h, tq, d = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().view(b, h_kv, h // h_kv, tq, d)  # (B, H_kv, G, Tq, D)
    kf, vf = k.float().unsqueeze(2), v.float().unsqueeze(2)  # (B, H_kv, 1, Tk, D)
    scores = torch.matmul(qg, kf.transpose(-1, -2)) * scale  # (B, H_kv, G, Tq, Tk)
    if causal:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H_kv, G, Tq)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0).unsqueeze(-1))
    out = torch.matmul(probs, vf)
    return out.reshape(b, h, tq, d).to(q.dtype), lse.reshape(b, h, tq)


def _flash_attn_kernel() -> AttentionKernel:
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:  # pragma: no cover - GPU extra
        raise ImportError(
            "attention kernel 'flash_attn' needs the flash-attn package on a CUDA machine: "
            "pip install 'cp_infer[gpu]' (or use kernel='torch_cpu_flash' on CPU)"
        ) from e

    def flash_attn(q, k, v, causal, scale=None):  # pragma: no cover - needs CUDA
        _check_shapes(q, k, v, causal)
        # flash-attn wants (B, T, H, D); its LSE is (B, H, Tq) float32.
        out, lse, _ = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            softmax_scale=scale,
            causal=causal,
            return_attn_probs=True,
        )
        return out.transpose(1, 2), lse

    return flash_attn


def _transformer_engine_kernel() -> AttentionKernel:
    try:
        from transformer_engine.pytorch.cpp_extensions.fused_attn import (
            FusedAttnBackend,
            fused_attn_fwd,
        )
    except ImportError as e:  # pragma: no cover - GPU extra
        raise ImportError(
            "attention kernel 'transformer_engine' needs Transformer Engine on a CUDA machine: "
            "pip install 'cp_infer[gpu]'. Never install transformer-engine on a CPU machine: "
            "the bare package breaks `import megatron.core`."
        ) from e

    def te_fused(q, k, v, causal, scale=None):  # pragma: no cover - needs CUDA
        _check_shapes(q, k, v, causal)
        b, h, tq, d = q.shape
        tk = k.shape[2]
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=q.device)
        cu_kv = torch.arange(0, (b + 1) * tk, tk, dtype=torch.int32, device=q.device)
        out, aux = fused_attn_fwd(
            True,  # is_training: makes TE return the softmax statistics
            tq,
            tk,
            cu_q,
            cu_kv,
            q.transpose(1, 2).contiguous(),
            k.transpose(1, 2).contiguous(),
            v.transpose(1, 2).contiguous(),
            q.dtype,
            FusedAttnBackend["F16_arbitrary_seqlen"],
            attn_scale=scale,
            qkv_layout="bshd_bshd_bshd",
            attn_mask_type="causal" if causal else "no_mask",
        )
        lse = aux[0].view(b, h, tq).float()
        return out.view(b, tq, h, d).transpose(1, 2), lse

    return te_fused


# name -> loader; loaders import optional backends lazily.
KERNELS: dict[str, Callable[[], AttentionKernel]] = {
    "torch_cpu_flash": lambda: torch_cpu_flash,
    "reference": lambda: reference_attention,
    "flash_attn": _flash_attn_kernel,
    "transformer_engine": _transformer_engine_kernel,
}


def get_kernel(
    name: str | AttentionKernel = "auto", device: torch.device | None = None
) -> AttentionKernel:
    """Look a kernel up by name (or pass a callable through).

    Args:
        name: one of ``KERNELS`` or ``"auto"`` (CPU: torch_cpu_flash; CUDA: flash_attn).
        device: used by ``"auto"``.
    """
    if callable(name):
        return name
    if name == "auto":
        name = "flash_attn" if device is not None and device.type == "cuda" else "torch_cpu_flash"
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {sorted(KERNELS)}")
    return KERNELS[name]()
