"""pass-Q ring attention: keys/values stay, query shards travel the ring (paper §3.3.2).

Note:
    When most of the context is cached, K/V is the big tensor and the new queries are small,
    so the queries move instead. Each rank computes the partial attention of every visiting
    query shard over its local K/V (prefix included) and keeps the result in the slot of the
    query's owner. After N-1 SendRecv steps one All2All sends every partial (output + LSE)
    home, and each owner merges its N partials::

        ring (N-1 SendRecv)          All2All            merge on the owner
        r0: Q0 Q3 Q2 Q1   ->   r0 gets O(Q0|KVr), r=0..3  ->   O(Q0) = merge_r
        r1: Q1 Q0 Q3 Q2   ->   r1 gets O(Q1|KVr)          ->   O(Q1)
        ...

    The All2All is on the critical path (it cannot start before the last step), which is what
    the adaptive selector (Alg. 1) weighs against pass-KV.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_infer.attention.blocks import KVPrefix, attend_step
from cp_infer.attention.comm import RingComm
from cp_infer.attention.kernels import AttentionKernel, get_kernel
from cp_infer.attention.kv_quant import dequantize_kv, quantize_kv
from cp_infer.attention.merge import merge_into_
from cp_infer.attention.pass_kv import check_ring_inputs
from cp_infer.sharding import ShardLayout

__all__ = ["ring_attention_pass_q"]


def _align(n_bytes: int) -> int:
    return -(-n_bytes // 8) * 8


def slot_bytes(h: int, t: int, d: int, dtype: torch.dtype) -> int:
    """Bytes of one All2All slot: the output in ``dtype``, then the float32 LSE, 8-aligned."""
    return _align(h * t * d * dtype.itemsize) + _align(h * t * 4)


def _pack(out: torch.Tensor, lse: torch.Tensor, slot: torch.Tensor) -> None:
    """Write (out, lse) as raw bytes into one All2All slot."""
    n_out = out.numel() * out.element_size()
    slot[:n_out].copy_(out.contiguous().view(-1).view(torch.uint8))
    lse_at = _align(n_out)
    slot[lse_at : lse_at + lse.numel() * 4].copy_(lse.contiguous().view(-1).view(torch.uint8))


def _unpack(slot: torch.Tensor, h: int, t: int, d: int, dtype: torch.dtype):
    n_out = h * t * d * dtype.itemsize
    out = slot[:n_out].view(dtype).view(h, t, d)
    lse_at = _align(n_out)
    lse = slot[lse_at : lse_at + h * t * 4].view(torch.float32).view(h, t)
    return out, lse


def ring_attention_pass_q(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ShardLayout,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = True,
    kernel: str | AttentionKernel = "auto",
    scale: float | None = None,
    prefix: KVPrefix | None = None,
    comm: RingComm | None = None,
    kv_dtype: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of this rank's queries over the whole (sharded) context, by pass-Q.

    Same arguments and result as :func:`~cp_infer.attention.pass_kv.ring_attention_pass_kv`.
    Partial outputs travel home in q's dtype, LSE in float32. With ``kv_dtype="fp8_e4m3"`` the
    local K/V are attended as their FP8 round trip (what an FP8 cache holds), like pass-KV.
    """
    comm = RingComm(group) if comm is None else comm
    check_ring_inputs(q, k, v, layout, comm, prefix)
    kernel = get_kernel(kernel, q.device)
    if kv_dtype == "fp8_e4m3":
        k, v = dequantize_kv(*quantize_kv(k), q.dtype), dequantize_kv(*quantize_kv(v), q.dtype)
    n, rank = comm.size, comm.rank
    h, t, d = q.shape
    blocks = prefix.blocks() if prefix is not None else None
    send = torch.empty(n, slot_bytes(h, t, d, q.dtype), dtype=torch.uint8, device=q.device)
    acc_out = torch.empty(h, t, d, dtype=torch.float32, device=q.device)
    acc_lse = torch.empty(h, t, dtype=torch.float32, device=q.device)

    cur, nxt = q.contiguous(), None
    for step in range(n):
        q_rank = (rank - step) % n
        if step + 1 < n:
            nxt = comm.send_recv(cur, nxt)
        attend_step(
            cur, k, v, layout, q_rank, rank, acc_out, acc_lse,
            causal=causal, kernel=kernel, scale=scale, prefix_blocks=blocks,
            fresh=True,
        )  # fmt: skip
        _pack(acc_out.to(q.dtype), acc_lse, send[q_rank])
        if step + 1 < n:
            comm.wait()
            # the buffer that held q itself must not be reused as a receive buffer
            cur, nxt = nxt, (cur if step > 0 else None)
    if n == 1:
        return acc_out.to(q.dtype), acc_lse.clone()
    recv = comm.all_to_all(send)
    # Merge the N partials one by one into fp32 accumulators (no N-way stacked copy).
    out, lse = _unpack(recv[0], h, t, d, q.dtype)
    acc_out.copy_(out)
    acc_lse.copy_(lse)
    for r in range(1, n):
        merge_into_(acc_out, acc_lse, *_unpack(recv[r], h, t, d, q.dtype))
    return acc_out.to(q.dtype), acc_lse
