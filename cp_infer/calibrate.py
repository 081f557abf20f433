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
- ``attention_flops_by_head_dim`` and ``gemm_flops_by_dim``: the same kernels at the head and
  model sizes of the small presets (16 to 128, 128 to 1024): a CPU kernel's rate depends on
  them;
- ``gemv_bandwidth``: bytes/s of a one-row GEMM over a large weight (what a decode step reads
  its weights at);
- ``decode_kv_bandwidth``: bytes/s of K/V that attention of one query over a long cache reads;
- ``decode_layer_s`` and ``decode_step_s``: what the engine's decode step costs beyond the
  bytes it reads, per layer and per step (kernel calls, bookkeeping, sampling): decode steps of
  a tiny-llama of 1 and of 3 layers, each rank alone; ``decode_cp_layer_s`` and
  ``decode_cp_step_s`` the same at CP = world (the exchanges among the ranks included);
- ``host_memory_bytes``: this host's RAM (not measured; shared by its ranks).

The profile (JSON) feeds ``--hardware PATH``: it is this machine's hardware model
(:meth:`cp_infer.hardware.Profile.from_calibration`), which ``--variant auto``, the server's
chunk sizing and ``plan`` read.
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


def _shape_rates(tokens: int, repeats: int, g) -> dict:
    """Attention FLOP/s by head size and GEMM FLOP/s by model width (one rank each)."""
    from cp_infer.attention.kernels import torch_cpu_flash

    t = tokens
    attention = {}
    for d in (16, 64, 128):
        q = torch.randn(1, 8, t, d, generator=g)
        k, v = (torch.randn(1, 2, t, d, generator=g) for _ in range(2))
        attention[str(d)] = (
            0.5
            * 4
            * t
            * t
            * 8
            * d
            / _best(lambda q=q, k=k, v=v: torch_cpu_flash(q, k, v, True), repeats)
        )
    gemm = {}
    for dim in (128, 512, 1024):
        x, w = torch.randn(t, dim, generator=g), torch.randn(dim, 4 * dim, generator=g)
        gemm[str(dim)] = 2 * t * dim * 4 * dim / _best(lambda x=x, w=w: x @ w, repeats)
    return {"attention_flops_by_head_dim": attention, "gemm_flops_by_dim": gemm}


def _decode_rates(repeats: int, g, weight_mib: int = 64, cache_tokens: int = 16384) -> dict:
    """What a decode step runs at: a one-row GEMM over a large weight, attention of one query
    over a long cache, and a small kernel call."""
    from cp_infer.attention.kernels import torch_cpu_flash

    dim = 2048
    w = torch.randn(dim, weight_mib * 2**20 // (4 * dim), generator=g)
    x = torch.randn(1, dim, generator=g)
    gemv_s = _best(lambda: x @ w, repeats)
    q = torch.randn(1, 8, 1, 128, generator=g)
    k, v = (torch.randn(1, 2, cache_tokens, 128, generator=g) for _ in range(2))
    kv_s = _best(lambda: torch_cpu_flash(q, k, v, False), repeats)
    return {
        "gemv_bandwidth": w.numel() * 4 / gemv_s,
        "decode_kv_bandwidth": (k.numel() + v.numel()) * 4 / kv_s,
    }


def _engine_overheads(steps: int = 32) -> dict:
    """The engine's fixed cost per decode layer and per decode step on this rank alone: the
    median decode step of a tiny-llama with 1 and with 3 layers (their weights and cache are
    a few MB: the step is its calls and bookkeeping)."""
    import statistics
    from dataclasses import replace

    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import SamplingConfig, generate
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    out = {}
    for cp, key in ((1, "decode"), (dist.get_world_size(), "decode_cp")):
        medians = {}
        with parallel_groups(cp=cp, timeout_s=120) as pg:  # cp=1: every rank its own engine
            for n_layers in (1, 3):
                cfg = replace(get_preset("tiny-llama"), n_layers=n_layers, max_seq_len=512)
                model = parallelize(cfg, pg, torch.float32)
                load_weights(model, RandomSource(0, cfg))
                prompt, sampling = [list(range(1, 17))], SamplingConfig(max_new_tokens=steps)
                generate(model, pg, prompt, sampling)  # warm: weights packed, exchange built
                r = generate(model, pg, prompt, sampling)
                medians[n_layers] = statistics.median(r.decode_step_s)
        per_layer = max(0.0, (medians[3] - medians[1]) / 2)
        t = torch.tensor([per_layer, max(0.0, medians[1] - per_layer)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's
        out[f"{key}_layer_s"], out[f"{key}_step_s"] = t[0].item(), t[1].item()
    return out


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

    # overlap: an attention a few times longer than the large SendRecv (as a ring step's is,
    # in a long prefill), run while the SendRecv is in flight: what it adds to the attention
    # is the SendRecv's exposed part
    rate = 0.5 * 4 * tokens * tokens * h * d / attn_s
    t = int(min(tokens, max(64, (4 * big_s * rate / (0.5 * 4 * h * d)) ** 0.5)))
    qo, ko, vo = q[:, :, :t].contiguous(), k[:, :, :t].contiguous(), v[:, :, :t].contiguous()
    alone_s = _best(lambda: torch_cpu_flash(qo, ko, vo, True), 3 * repeats)

    def overlapped():
        comm = RingComm()
        comm.send_recv(big)
        torch_cpu_flash(qo, ko, vo, True)
        comm.wait()

    both_s = _best(overlapped, 3 * repeats)
    hidden = 1 - max(0.0, both_s - alone_s) / big_s
    n = dist.get_world_size()
    slots = torch.zeros(n * (message_bytes // 4 // n))
    out = torch.empty_like(slots)
    a2a_s = _best(lambda: dist.all_to_all_single(out, slots), repeats)
    stream = torch.ones(read_bytes // 4)
    read_s = _best(stream.sum, repeats)
    shapes = _shape_rates(tokens, repeats, g)
    decode = _decode_rates(repeats, g) | _engine_overheads()
    return {
        "attention_flops": 0.5 * 4 * tokens * tokens * h * d / attn_s,
        "gemm_flops": 2 * tokens * dim * 4 * dim / gemm_s,
        "ring_bandwidth": message_bytes / max(big_s - tiny_s, 1e-9),
        "ring_latency_s": tiny_s,
        "all2all_s": a2a_s,
        "all2all_bytes": message_bytes,
        "overlap": min(1.0, max(0.0, hidden)),
        "memory_bandwidth": stream.numel() * 4 / read_s,
        **shapes,
        **decode,
        "host_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "world": n,
        "threads_per_rank": torch.get_num_threads(),
        "tokens": tokens,
    }
