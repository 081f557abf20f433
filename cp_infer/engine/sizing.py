"""How much KV cache a sequence takes: the one place for blocks per CP rank and bytes per token.

Torch-free: the API process, the planner and the pool all size from here.
"""

from __future__ import annotations

import math

__all__ = ["blocks_for_tokens", "kv_element_bytes", "token_bytes"]


def blocks_for_tokens(tokens: int, cp: int, block_size: int) -> int:
    """Blocks that ``tokens`` of one sequence take on the CP rank that gets the most of them
    (the load-balanced layout gives each ``tokens / cp`` within a couple of tokens, decode's
    round robin within one), plus the block a shared prefix's partial tail is copied into."""
    return math.ceil((math.ceil(tokens / cp) + 2) / block_size) + 1


def kv_element_bytes(kv_dtype: str, dtype_bytes: int, head_dim: int) -> float:
    """Bytes per stored K or V element: the model's (``"auto"``), or FP8's byte and its float32
    scale per (head, token) spread over the head's ``head_dim`` elements."""
    return 1 + 4 / head_dim if kv_dtype == "fp8_e4m3" else dtype_bytes


def token_bytes(
    n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: int, kv_dtype: str = "auto"
) -> int:  # fmt: skip
    """Bytes of one token's K and V over ``n_layers`` layers (FP8: with its scales)."""
    if kv_dtype == "fp8_e4m3":
        return 2 * n_layers * n_kv_heads * (head_dim + 4)
    return 2 * n_layers * n_kv_heads * head_dim * dtype_bytes
