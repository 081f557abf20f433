"""pass-KV ring attention: queries stay, key/value shards travel the ring (paper §3.3.1).

Note:
    With N CP ranks, every rank keeps its queries and sends its K/V shard (only the KV heads,
    plus its cached prefix) around the ring in N-1 SendRecv steps, each one batched exchange.
    Each step's exchange is posted before the attention on the shard already held::

        step 0            step 1            ...   step N-1
        r0: KV0 ─┐        r0: KV3 ─┐              r0: KV1
        r1: KV1  ├─>      r1: KV0  ├─>            r1: KV2
        r2: KV2  │        r2: KV1  │              r2: KV3
        r3: KV3 ─┘(ring)  r3: KV2 ─┘              r3: KV0

    At step s rank i holds the shard of rank (i - s) mod N, attends its queries to it with the
    causal plan of :func:`~cp_infer.attention.causal.plan_block`, and merges the partial result
    into fp32 accumulators by LSE. No step is ever fully skipped under the load-balanced layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_infer.attention.blocks import KVPrefix, attend_step
from cp_infer.attention.comm import RingComm
from cp_infer.attention.kernels import AttentionKernel, get_kernel
from cp_infer.attention.kv_quant import dequantize_kv, quantize_kv
from cp_infer.sharding import ShardLayout

__all__ = ["check_ring_inputs", "ring_attention_pass_kv"]


def check_ring_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ShardLayout,
    comm: RingComm,
    prefix: KVPrefix | None,
) -> None:
    """Shape checks shared by both variants; raise ValueError (the same on every rank)."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"expected q (H, T, D) and k, v (H_kv, T, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    h, t, d = q.shape
    h_kv = k.shape[0]
    if h % h_kv:
        raise ValueError(f"query heads {h} are not a multiple of KV heads {h_kv}")
    if k.shape[1] != t or k.shape[2] != d:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)}")
    if layout.cp != comm.size:
        raise ValueError(
            f"the layout is for cp={layout.cp} but the CP group has {comm.size} ranks; "
            "build the ShardLayout with the CP group's size"
        )
    if t != layout.t_local:
        raise ValueError(
            f"q has {t} local tokens but the layout gives t_local={layout.t_local}; "
            "shard the batch with cp_infer.sharding.shard(x, layout, cp_rank)"
        )
    if prefix is not None:
        if prefix.cp != layout.cp or prefix.n_seqs != layout.n_seqs:
            raise ValueError(
                f"the KV prefix describes cp={prefix.cp}, {prefix.n_seqs} sequences; "
                f"the layout cp={layout.cp}, {layout.n_seqs} sequences"
            )
        for segs in prefix.k:
            for seg in segs:
                if seg.shape[0] != h_kv or seg.shape[2] != d:
                    raise ValueError(
                        f"a prefix segment {tuple(seg.shape)} does not match k {tuple(k.shape)}"
                    )


def ring_attention_pass_kv(
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
    """Exact attention of this rank's queries over the whole (sharded) context, by pass-KV.

    Args:
        q: (H, t_local, D) this rank's load-balanced query shard (see ``cp_infer.sharding``).
        k, v: (H_kv, t_local, D) this rank's new keys/values (GQA: H_kv divides H).
        layout: the batch layout; ``layout.cp`` must equal the CP group size.
        group: the CP process group (``None``: default group, or a single process).
        causal: causal mask over each sequence (prefix tokens are always visible).
        kernel: local attention kernel name or callable (see ``attention.kernels``).
        scale: softmax scale; default ``1/sqrt(D)``.
        prefix: cached keys/values on this rank for persistent-KV prefill.
        comm: a :class:`RingComm` to reuse (and read statistics from).
        kv_dtype: ``"fp8_e4m3"``: K/V are quantized per (head, token) before they travel (as an
            FP8 KV cache holds them) and attended dequantized; ``"auto"``: as given.

    Returns:
        (out, lse): (H, t_local, D) in q's dtype and (H, t_local) float32.
    """
    comm = RingComm(group) if comm is None else comm
    check_ring_inputs(q, k, v, layout, comm, prefix)
    kernel = get_kernel(kernel, q.device)
    n, rank = comm.size, comm.rank
    h, t, d = q.shape
    acc_out = torch.empty(h, t, d, dtype=torch.float32, device=q.device)
    acc_lse = torch.empty(h, t, dtype=torch.float32, device=q.device)

    # What travels each step: the new K and V and, for persistent-KV prefill, the cached
    # prefix segments head by head, as they lie in the cache, all as tensors of one batched
    # SendRecv (the cache is never copied into a send buffer). Receive buffers are shaped for
    # the sender: every rank knows every rank's segment lengths.
    # With an FP8 KV cache the new K/V travel as FP8 with a scale per (head, token), the form
    # they are cached in, and every rank attends their dequantized values (its own included).
    fp8 = kv_dtype == "fp8_e4m3"
    mine = [*quantize_kv(k), *quantize_kv(v)] if fp8 else [k.contiguous(), v.contiguous()]
    n_new = len(mine)
    cur = mine + (prefix.pieces() if prefix is not None else [])
    cur_blocks = prefix.blocks() if prefix is not None else None
    for step in range(n):
        kv_rank = (rank - step) % n
        if step + 1 < n:
            recv = [torch.empty_like(t) for t in cur[:n_new]]
            if prefix is not None:
                pieces, recv_blocks = prefix.receive((rank - step - 1) % n, like=mine[0])
                recv += pieces
            nxt = comm.send_recv(cur, recv)
        sk, sv = cur[0], cur[1]
        if fp8:
            sk, sv = dequantize_kv(cur[0], cur[1], q.dtype), dequantize_kv(cur[2], cur[3], q.dtype)
        attend_step(
            q, sk, sv, layout, rank, kv_rank, acc_out, acc_lse,
            causal=causal, kernel=kernel, scale=scale, prefix_blocks=cur_blocks, fresh=step == 0,
        )  # fmt: skip
        if step + 1 < n:
            comm.wait()
            cur = nxt
            cur_blocks = recv_blocks if prefix is not None else None
    return acc_out.to(q.dtype), acc_lse
