"""Measure this machine's speeds for the selector and the planner (``python -m cp_infer calibrate``).

Per rank, in a pool of ``world`` gloo ranks with one thread each (as the benchmarks run):

- ``attention_flops``: the causal CPU flash kernel on one rank's shard (FLOPs as appendix A
  counts them: ``1/2 * 4 * T^2 * H * D``);
- ``gemm_flops``: a (T, dim) x (dim, 4 dim) matmul;
- ``ring_bandwidth`` and ``ring_latency_s``: a SendRecv step around the ring, of one large
  and one tiny message;
- ``ring_step_s``: what a prefill ring step costs beyond that latency and its kernel, as the
  engine's ring runs it, the ranks' skew included (pass-KV over a few tokens per rank after a
  layer's worth of small GEMMs, against the same tokens on one rank: medians, per step);
- ``all2all_s``: one All2All of the large message;
- ``overlap``: the share of a ring step's communication that hides behind attention: the large
  SendRecv posted, the attention run, then waited for, against the attention alone (the median
  of back-to-back pairs) and the SendRecv alone. On one CPU host
  the loopback copies take the same cores as the kernel, so communication is not free even
  when "overlapped";
- ``memory_bandwidth``: bytes/s of one pass reading a large fp32 tensor (a sum), every rank at
  once, as decode reads weights and KV cache;
- ``attention_flops_by_head_dim`` and ``gemm_flops_by_dim``: the same kernels at the head and
  model sizes of the small presets (16 to 128, 128 to 1024), attention also at a quarter and
  four times the tokens: a CPU kernel's rate depends on them;
- ``gemm_flops_by_rows``: the engine's linears over 1 to 256 rows at a time, 32 MiB of them
  (a short prompt's GEMMs run far below the large ones' rate);
- ``activation_bandwidth``: bytes/s of a prefill layer's elementwise passes (norms, RoPE,
  residual adds, SwiGLU's product), which a CPU runs one kernel at a time;
- ``gemv_bandwidth``: bytes/s of one row through the engine's linears, layers of them larger
  than the caches (what a decode step reads its weights at);
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

import math
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

__all__ = ["measure_rank"]


@dataclass(frozen=True)
class Timing:
    """How a best is taken: over at least ``repeats`` runs and ``min_s`` seconds of them (a
    short kernel's best of 3 is noise on a busy machine)."""

    repeats: int
    min_s: float = 0.5


def _best(fn, timing: Timing) -> float:
    """The slowest rank's best of the runs ``timing`` asks for (every rank runs as many)."""
    repeats, min_s = timing.repeats, timing.min_s
    t0 = time.perf_counter()
    fn()
    warm = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(warm, op=dist.ReduceOp.MAX)  # every rank runs as many
    times = []
    for _ in range(max(repeats, min(100, math.ceil(min_s / max(warm.item(), 1e-6))))):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([min(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's best
    return t.item()


def _paired_difference(alone, both, pairs: int) -> float:
    """The median over ``pairs`` of ``both``'s time less ``alone``'s, run back to back (the
    slowest rank's): a small difference between two long times, steadier than the difference
    of their bests while the machine's speed drifts."""
    import statistics

    alone()
    both()
    diffs = []
    for _ in range(pairs):
        times = []
        for fn in (alone, both):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        diffs.append(times[1] - times[0])
    t = torch.tensor([statistics.median(diffs)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _shape_rates(tokens: int, timing: Timing, g) -> dict:
    """Causal attention FLOP/s by head size and by the queries of a call (``tokens`` / 4,
    ``tokens`` and 4 x ``tokens``: the calls of a short prompt at high CP and of a long one at
    CP 1), and GEMM FLOP/s by model width (one rank each)."""
    from cp_infer.attention.kernels import torch_cpu_flash

    t = tokens
    attention = {}
    for d in (16, 64, 128):
        attention[str(d)] = {}
        for n in (max(16, t // 4), t, 4 * t):
            h = 8 if n <= t else 4  # GQA 4 either way; fewer heads keep the long call short
            q = torch.randn(1, h, n, d, generator=g)
            k, v = (torch.randn(1, h // 4, n, d, generator=g) for _ in range(2))
            s = _best(lambda q=q, k=k, v=v: torch_cpu_flash(q, k, v, True), timing)
            attention[str(d)][str(n)] = 0.5 * 4 * n * n * h * d / s
    gemm = {}
    for dim in (128, 512, 1024):
        x, w = torch.randn(t, dim, generator=g), torch.randn(dim, 4 * dim, generator=g)
        gemm[str(dim)] = 2 * t * dim * 4 * dim / _best(lambda x=x, w=w: x @ w, timing)
    return {"attention_flops_by_head_dim": attention, "gemm_flops_by_dim": gemm,
            "gemm_flops_by_rows": _row_rates(timing, g)}  # fmt: skip


def _row_rates(timing: Timing, g, weight_bytes: int = 32 << 20) -> dict:
    """FLOP/s of the engine's linears over a few rows (a short prompt's or a decode step's
    GEMMs): layers 512 wide, ``weight_bytes`` of them (more than the caches hold)."""
    from torch import nn

    from cp_infer.parallel.tensor_parallel import small_linear

    dim = 512
    shapes = [(dim, 3 * dim), (dim, dim), (dim, 3 * dim), (3 * dim, dim)]
    per_layer = sum(i * o for i, o in shapes) * 4
    linears = [nn.Linear(i, o, bias=False) for _ in range(-(-weight_bytes // per_layer))
               for i, o in shapes]  # fmt: skip
    flops = 2 * sum(m.in_features * m.out_features for m in linears)
    out = {}
    for rows in (1, 4, 16, 64, 256):
        x = {n: torch.randn(rows, n, generator=g) for n in (dim, 3 * dim)}

        @torch.no_grad()
        def run(x=x) -> None:
            for m in linears:
                small_linear(x[m.in_features], m)

        out[str(rows)] = rows * flops / _best(run, timing)
    return out


def _decode_rates(timing: Timing, g, weight_bytes: int, cache_tokens: int = 16384) -> dict:
    """What a decode step runs at: one row through the engine's linears (layers of a model
    1024 wide, ``weight_bytes`` of them: more than the caches hold, as a model's weights are)
    and attention of one query over a long cache."""
    from torch import nn

    from cp_infer.attention.kernels import torch_cpu_flash
    from cp_infer.parallel.tensor_parallel import small_linear

    dim, ffn = 1024, 2816
    shapes = [(dim, dim), (dim, dim // 4), (dim, dim // 4), (dim, dim), (dim, ffn), (dim, ffn),
              (ffn, dim)]  # fmt: skip
    per_layer = sum(i * o for i, o in shapes) * 4
    linears = [nn.Linear(i, o, bias=False) for _ in range(-(-weight_bytes // per_layer))
               for i, o in shapes]  # fmt: skip
    rows = {n: torch.randn(1, n, generator=g) for n in (dim, ffn)}

    @torch.no_grad()
    def gemv():
        for m in linears:
            small_linear(rows[m.in_features], m)

    gemv_s = _best(gemv, timing)
    q = torch.randn(1, 8, 1, 128, generator=g)
    k, v = (torch.randn(1, 2, cache_tokens, 128, generator=g) for _ in range(2))
    kv_s = _best(lambda: torch_cpu_flash(q, k, v, False), timing)
    return {
        "gemv_bandwidth": len(linears) // len(shapes) * per_layer / gemv_s,
        "decode_kv_bandwidth": (k.numel() + v.numel()) * 4 / kv_s,
    }


def _activation_rate(tokens: int, timing: Timing, g) -> dict:
    """Bytes/s of a prefill layer's elementwise passes, as the model runs them: two RMSNorms,
    RoPE on the queries and keys, two residual adds and SwiGLU's product, on ``tokens`` tokens of
    a model 1024 wide; bytes as :func:`cp_infer.hardware.activation_elements` counts them (the
    cache store and layout copies by a copy of the same size)."""
    import torch.nn.functional as F

    from cp_infer.hardware import activation_elements
    from cp_infer.models import get_preset
    from cp_infer.models.llama import RMSNorm
    from cp_infer.models.rope import apply_rope

    cfg = replace(get_preset("small-llama"), dim=1024, n_heads=8, n_kv_heads=2, ffn_dim=2816)
    norm = RMSNorm(cfg.dim, cfg.norm_eps)
    x = torch.randn(tokens, cfg.dim, generator=g)
    q = torch.randn(tokens, cfg.n_heads, cfg.head_dim, generator=g)
    k = torch.randn(tokens, cfg.n_kv_heads, cfg.head_dim, generator=g)
    cos, sin = (torch.randn(tokens, cfg.head_dim, generator=g) for _ in range(2))
    gate, up = (torch.randn(tokens, cfg.ffn_dim, generator=g) for _ in range(2))
    kv = torch.empty(2, tokens, cfg.n_kv_heads, cfg.head_dim)

    @torch.no_grad()
    def layer():
        h = x + norm(x)
        apply_rope(q, cos, sin).contiguous()
        kv[0].copy_(apply_rope(k, cos, sin))
        kv[1].copy_(k)
        q.transpose(0, 1).contiguous().transpose(0, 1).reshape(tokens, -1).contiguous()
        return h + norm(h), F.silu(gate) * up

    seconds = _best(layer, timing)
    return {"activation_bandwidth": tokens * activation_elements(cfg) * 4 / seconds}


def _engine_overheads(steps: int = 32) -> dict:
    """The engine's fixed cost per decode layer and per decode step: the median decode step
    of a tiny-llama with 1 and with 3 layers (their weights and cache are a few MB: the step is
    its calls and bookkeeping), on rank 0 alone, then at CP over every rank."""

    from parallel_state import parallel_groups

    out = {}
    for cp, key in ((1, "decode"), (dist.get_world_size(), "decode_cp")):
        medians = {1: 0.0, 3: 0.0}
        with parallel_groups(cp=cp, timeout_s=120) as pg:
            # cp=1: rank 0 alone on the host (the others wait), as an engine of one rank runs
            if cp > 1 or dist.get_rank() == 0:
                medians = _decode_medians(pg, steps)
        dist.barrier()
        per_layer = max(0.0, (medians[3] - medians[1]) / 2)
        t = torch.tensor([per_layer, max(0.0, medians[1] - per_layer)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's
        out[f"{key}_layer_s"], out[f"{key}_step_s"] = t[0].item(), t[1].item()
    return out


def _decode_medians(pg, steps: int) -> dict[int, float]:
    """The median decode step of a tiny-llama of 1 and of 3 layers on ``pg``."""
    import statistics

    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import SamplingConfig, generate
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize

    models = {}
    for n_layers in (1, 3):
        cfg = replace(get_preset("tiny-llama"), n_layers=n_layers, max_seq_len=512)
        models[n_layers] = parallelize(cfg, pg, torch.float32)
        load_weights(models[n_layers], RandomSource(0, cfg))
    prompt, sampling = [list(range(1, 17))], SamplingConfig(max_new_tokens=steps)
    medians = {n: float("inf") for n in models}
    for _ in range(3):  # interleaved, the best median of each: the machine drifts
        for n, model in models.items():
            r = generate(model, pg, prompt, sampling)  # the first warms: weights packed
            medians[n] = min(medians[n], statistics.median(r.decode_step_s))
    return medians


def _ring_step_cost(g, latency_s: float, steps: int = 60) -> float:
    """What one step of a prefill's ring costs beyond its SendRecv's latency and its kernel,
    as the engine's ring runs it: the batched SendRecv of K and V posted and waited for, the
    step's kernel call and merge, and the ranks' skew (each waits for the slower). Pass-KV
    over a few tokens per rank, each call after a layer's worth of small-row GEMMs, against the
    same tokens attended on this rank alone (a ring of one); the median of back-to-back calls
    (the best one hides the waits a step typically has), per step."""
    import statistics
    import time

    from torch import nn

    from cp_infer.attention import ring_attention_pass_kv
    from cp_infer.attention.comm import RingComm
    from cp_infer.parallel.tensor_parallel import small_linear
    from cp_infer.sharding import ShardLayout

    n = dist.get_world_size()
    if n == 1:
        return 0.0
    h, h_kv, d, per_rank, dim = 8, 2, 64, 4, 512
    q = torch.randn(h, per_rank, d, generator=g)
    k, v = (torch.randn(h_kv, per_rank, d, generator=g) for _ in range(2))
    layouts = {True: ShardLayout([per_rank * n], n), False: ShardLayout([per_rank], 1)}
    linear, x = nn.Linear(dim, 3 * dim, bias=False), torch.randn(per_rank, dim, generator=g)

    @torch.no_grad()
    def step(ring: bool) -> None:
        small_linear(x, linear)
        if ring:
            ring_attention_pass_kv(q, k, v, layouts[True])
        else:
            ring_attention_pass_kv(q, k, v, layouts[False], comm=RingComm.alone())

    medians: dict[bool, float] = {True: float("inf"), False: float("inf")}
    for ring in (False, True, False, True):  # interleaved: the machine drifts
        dist.barrier()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step(ring)
            times.append(time.perf_counter() - t0)
        medians[ring] = min(medians[ring], statistics.median(times[steps // 6 :]))
    return max(0.0, (medians[True] - medians[False]) / (n - 1) - latency_s)


def measure_rank(
    tokens: int, message_bytes: int, repeats: int, read_bytes: int = 256 * 2**20,
    min_s: float = 0.5,
) -> dict:  # fmt: skip
    """Runs on every rank of a pool; returns the profile (the same on every rank).

    Args:
        tokens: tokens per rank in the attention and GEMM kernels.
        message_bytes: the large ring / All2All message.
        repeats: best of this many.
        read_bytes: the tensor the memory-bandwidth pass reads (large enough to miss caches).
        min_s: every best is over at least this many seconds of runs.
    """
    timing = Timing(repeats, min_s)
    from cp_infer.attention.comm import RingComm
    from cp_infer.attention.kernels import torch_cpu_flash

    g = torch.Generator().manual_seed(0)
    h, h_kv, d = 8, 2, 128
    q = torch.randn(1, h, tokens, d, generator=g)
    k, v = (torch.randn(1, h_kv, tokens, d, generator=g) for _ in range(2))
    attn_s = _best(lambda: torch_cpu_flash(q, k, v, True), timing)
    dim = 1024
    x, w = torch.randn(tokens, dim, generator=g), torch.randn(dim, 4 * dim, generator=g)
    gemm_s = _best(lambda: x @ w, timing)
    big = torch.zeros(message_bytes // 4)
    tiny = torch.zeros(2)

    def ring(t):
        comm = RingComm()
        comm.send_recv(t)
        comm.wait()

    big_s, tiny_s = _best(lambda: ring(big), timing), _best(lambda: ring(tiny), timing)
    step_s = _ring_step_cost(g, tiny_s)

    # overlap: an attention a few times longer than the large SendRecv (as a ring step's is,
    # in a long prefill), run while the SendRecv is in flight: what it adds to the attention
    # is the SendRecv's exposed part
    rate = 0.5 * 4 * tokens * tokens * h * d / attn_s
    t = int(min(tokens, max(64, (4 * big_s * rate / (0.5 * 4 * h * d)) ** 0.5)))
    qo, ko, vo = q[:, :, :t].contiguous(), k[:, :, :t].contiguous(), v[:, :, :t].contiguous()

    def overlapped():
        comm = RingComm()
        comm.send_recv(big)
        torch_cpu_flash(qo, ko, vo, True)
        comm.wait()

    exposed_s = _paired_difference(lambda: torch_cpu_flash(qo, ko, vo, True), overlapped,
                                   5 * repeats)  # fmt: skip
    hidden = 1 - max(0.0, exposed_s) / big_s
    n = dist.get_world_size()
    slots = torch.zeros(n * (message_bytes // 4 // n))
    out = torch.empty_like(slots)
    a2a_s = _best(lambda: dist.all_to_all_single(out, slots), timing)
    stream = torch.ones(read_bytes // 4)
    read_s = _best(stream.sum, timing)
    shapes = _shape_rates(tokens, timing, g) | _activation_rate(tokens, timing, g)
    decode = _decode_rates(timing, g, read_bytes) | _engine_overheads()
    return {
        "attention_flops": 0.5 * 4 * tokens * tokens * h * d / attn_s,
        "gemm_flops": 2 * tokens * dim * 4 * dim / gemm_s,
        "ring_bandwidth": message_bytes / max(big_s - tiny_s, 1e-9),
        "ring_latency_s": tiny_s,
        "ring_step_s": step_s,
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
