"""Measure this machine's speeds for the selector and the planner (``python -m cp_infer calibrate``).

Per rank, in a pool of ``world`` gloo ranks with one thread each (as the benchmarks run):

- ``attention_flops``: the causal CPU flash kernel on one rank's shard (FLOPs as appendix A
  counts them: ``1/2 * 4 * T^2 * H * D``);
- ``gemm_flops``: a (T, dim) x (dim, 4 dim) matmul;
- ``ring_bandwidth`` and ``ring_latency_s``: a SendRecv step around the ring, of one large
  and one tiny message;
- ``all2all_s``: one All2All of the large message;
- ``overlap``: the share of a ring step's communication that hides behind attention: the large
  SendRecv posted, the attention run, then waited for, against the two alone. On one CPU host
  the loopback copies take the same cores as the kernel, so communication is not free even
  when "overlapped";
- ``memory_bandwidth``: bytes/s of one pass reading a large fp32 tensor (a sum), every rank at
  once, as decode reads weights and KV cache;
- ``host_memory_bytes``: this host's RAM (not measured; shared by its ranks).

The profile (JSON) feeds ``--hardware PATH``: ``attention_flops`` is Alg. 1's C and
``ring_bandwidth`` its BW for ``generate``, and the whole profile is the cost model's hardware
for ``plan`` and the chunk sizing (:meth:`cp_infer.hardware.Profile.from_calibration`).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

__all__ = ["measure_rank"]


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([min(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's best
    return t.item()


def measure_rank(
    tokens: int, message_bytes: int, repeats: int, read_bytes: int = 256 * 2**20
) -> dict:
    """Runs on every rank of a pool; returns the profile (the same on every rank).

    Args:
        tokens: tokens per rank in the attention and GEMM kernels.
        message_bytes: the large ring / All2All message.
        repeats: best of this many.
        read_bytes: the tensor the memory-bandwidth pass reads (large enough to miss caches).
    """
    from cp_infer.attention.comm import RingComm
    from cp_infer.attention.kernels import torch_cpu_flash

    g = torch.Generator().manual_seed(0)
    h, h_kv, d = 8, 2, 128
    q = torch.randn(1, h, tokens, d, generator=g)
    k, v = (torch.randn(1, h_kv, tokens, d, generator=g) for _ in range(2))
    attn_s = _best(lambda: torch_cpu_flash(q, k, v, True), repeats)
    dim = 1024
    x, w = torch.randn(tokens, dim, generator=g), torch.randn(dim, 4 * dim, generator=g)
    gemm_s = _best(lambda: x @ w, repeats)
    big = torch.zeros(message_bytes // 4)
    tiny = torch.zeros(2)

    def ring(t):
        comm = RingComm()
        comm.send_recv(t)
        comm.wait()

    big_s, tiny_s = _best(lambda: ring(big), repeats), _best(lambda: ring(tiny), repeats)

    def overlapped():
        comm = RingComm()
        comm.send_recv(big)
        torch_cpu_flash(q, k, v, True)
        comm.wait()

    both_s = _best(overlapped, repeats)
    hidden = (attn_s + big_s - both_s) / min(attn_s, big_s)
    n = dist.get_world_size()
    slots = torch.zeros(n * (message_bytes // 4 // n))
    out = torch.empty_like(slots)
    a2a_s = _best(lambda: dist.all_to_all_single(out, slots), repeats)
    stream = torch.ones(read_bytes // 4)
    read_s = _best(stream.sum, repeats)
    return {
        "attention_flops": 0.5 * 4 * tokens * tokens * h * d / attn_s,
        "gemm_flops": 2 * tokens * dim * 4 * dim / gemm_s,
        "ring_bandwidth": message_bytes / max(big_s - tiny_s, 1e-9),
        "ring_latency_s": tiny_s,
        "all2all_s": a2a_s,
        "all2all_bytes": message_bytes,
        "overlap": min(1.0, max(0.0, hidden)),
        "memory_bandwidth": stream.numel() * 4 / read_s,
        "host_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "world": n,
        "threads_per_rank": torch.get_num_threads(),
        "tokens": tokens,
    }
