"""Memory planner: the bytes one rank needs for a model, a layout and a context.

Pure arithmetic on the model config, so it runs for the real shapes (Llama 3 405B at 1M tokens)
on any machine. Per rank:

- **weights**: this pipeline stage's layers, split by TP (attention heads, FFN columns; KV heads
  are replicated when tp > n_kv_heads) and EP (experts), FP8 layers at one byte per weight plus
  a float32 scale per output row; the embedding on the first stage and the LM head on the last
  (both vocabulary-split by TP, padded as Megatron pads). The stage that needs more is counted.
- **KV cache**: this rank's share of every sequence (``ceil(context / cp)`` tokens, the
  load-balanced shard; decode tokens land round-robin) for this stage's layers, at the KV dtype
  (FP8 adds a float32 scale per token and KV head).
- **activations**: the peak of one prefill layer on this rank's shard: the residual stream and
  the norm's output, the FFN's two intermediate columns (the MoE's are per routed token), and
  ring attention's fp32 accumulators plus two KV shards in flight. An estimate of the largest
  live set, not a measurement; it ignores the allocator's fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cp_infer.engine.sizing import token_bytes
from cp_infer.models.config import ModelConfig
from cp_infer.parallel.tensor_parallel import padded_vocab_size

__all__ = ["KV_DTYPES", "MemoryPlan", "TierPlan", "check_fits", "device_memory", "parse_bytes",
           "plan_host_tier", "plan_memory"]  # fmt: skip

KV_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8_e4m3": 1}
_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"80GiB"`` -> 85899345920; plain integers are bytes."""
    s = text.strip().upper().replace(" ", "")
    digits = s.rstrip("KMGTIB")
    unit = s[len(digits) :]
    try:
        return int(float(digits) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(
            f"cannot read {text!r} as a size; write e.g. 80GiB, 512MiB or 1000000"
        ) from None


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes of one layout (see the module docstring for what each counts)."""

    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    total_bytes: int
    device_bytes: int
    fits: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _linear_bytes(n_weights: int, rows: int, fp8: bool, dtype_bytes: int) -> int:
    return n_weights + 4 * rows if fp8 else n_weights * dtype_bytes


def plan_memory(
    cfg: ModelConfig,
    *,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    context: int,
    batch: int = 1,
    dtype_bytes: int = 2,
    quant: str = "none",
    fp8_layers: tuple[str, ...] = ("ffn",),
    kv_dtype: str = "bfloat16",
    device_bytes: int = 80 * 2**30,
    make_vocab_size_divisible_by: int = 128,
) -> MemoryPlan:
    """The per-rank memory of ``cfg`` under a layout, for ``batch`` sequences of ``context``."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown --kv-dtype {kv_dtype!r}; choose one of {sorted(KV_DTYPES)}")
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got {context} and {batch}")
    fp8_ffn = quant == "fp8" and "ffn" in fp8_layers
    fp8_attn = quant == "fp8" and "attention" in fp8_layers
    hd, dim = cfg.head_dim, cfg.dim
    heads = cfg.n_heads // tp
    kv_heads = max(1, cfg.n_kv_heads // tp)
    layers = math.ceil(cfg.n_layers / pp)
    # -- weights ----------------------------------------------------------------------------
    attn = sum(
        _linear_bytes(rows * cols, rows, fp8_attn, dtype_bytes)
        for rows, cols in ((heads * hd, dim), (kv_heads * hd, dim), (kv_heads * hd, dim),
                           (dim, heads * hd))
    )  # fmt: skip
    ffn_cols = cfg.ffn_dim // tp
    one_ffn = 2 * _linear_bytes(ffn_cols * dim, ffn_cols, fp8_ffn, dtype_bytes)
    one_ffn += _linear_bytes(dim * ffn_cols, dim, fp8_ffn, dtype_bytes)
    if cfg.is_moe:
        ffn = (cfg.n_experts // ep) * one_ffn + cfg.n_experts * dim * dtype_bytes  # + router
    else:
        ffn = one_ffn
    per_layer = attn + ffn + 2 * dim * dtype_bytes  # + the two norms
    vocab = padded_vocab_size(cfg.vocab_size, tp, make_vocab_size_divisible_by) // tp
    ends = vocab * dim * dtype_bytes * (2 if pp == 1 else 1) + dim * dtype_bytes
    weights = layers * per_layer + ends
    # -- KV cache ---------------------------------------------------------------------------
    t_rank = math.ceil(context / cp) * batch
    per_token = 2 * kv_heads * hd * KV_DTYPES[kv_dtype]
    if kv_dtype == "fp8_e4m3":
        per_token += 2 * kv_heads * 4  # a float32 scale per (token, KV head), for K and V
    kv = layers * t_rank * per_token
    # -- activations: one prefill layer on this rank's shard ----------------------------------
    t_local = 2 * math.ceil(context / (2 * cp)) * batch
    residual = 3 * t_local * dim * dtype_bytes
    routed = t_local * (cfg.top_k if cfg.is_moe else 1)
    ffn_act = 2 * routed * ffn_cols * dtype_bytes
    ring = (heads * t_local * (hd + 1) * 4  # fp32 output and LSE accumulators
            + 2 * 2 * kv_heads * t_local * hd * KV_DTYPES[kv_dtype])  # K/V shard + the next  # fmt: skip
    activations = residual + max(ffn_act, ring)
    total = weights + kv + activations
    return MemoryPlan(weights, kv, activations, total, device_bytes, total <= device_bytes)


@dataclass(frozen=True)
class TierPlan:
    """What a host-memory KV tier holds for a layout, and how fast it gives a prompt back.

    Attributes:
        entry_bytes: one conversation's K/V in the tier (every layer, every KV head once,
            FP8 scales included), over all its hosts.
        hosts: hosts the layout spans (its devices over ``devices_per_host``).
        host_bytes: of one conversation, what each host holds (its ranks' shares).
        conversations: conversations the tier's host memory holds.
        read_s: reading one conversation back (each host its share, at the host's bandwidth,
            all hosts at once).
        prefill_s: prefilling it again instead (the hardware model's TTFT).
    """

    entry_bytes: int
    hosts: int
    host_bytes: int
    conversations: int
    read_s: float
    prefill_s: float

    @property
    def speedup(self) -> float:
        return self.prefill_s / self.read_s

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def plan_host_tier(
    cfg: ModelConfig, *, tp: int, cp: int, pp: int, context: int, kv_dtype: str,
    host_memory: int, host_bytes_s: float, devices_per_host: int, prefill_s: float,
) -> TierPlan:  # fmt: skip
    """A host-memory KV tier (``serve --kv-tier host``) for ``context``-token conversations:
    how many fit ``host_memory`` per host, and their read-back against a re-prefill."""
    if host_memory < 1 or host_bytes_s <= 0:
        raise ValueError("--host-memory and --host-bandwidth must be > 0")
    per_token = token_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, KV_DTYPES[kv_dtype],
                            kv_dtype)  # fmt: skip
    entry = context * (per_token + 8)  # (+ each token's position)
    hosts = max(1, math.ceil(tp * cp * pp / devices_per_host))
    host = math.ceil(entry / hosts)
    return TierPlan(entry, hosts, host, host_memory // host, host / host_bytes_s, prefill_s)


def device_memory(spec: str, device) -> int:
    """Bytes one rank may use: ``spec`` as a size, or for ``"auto"`` the GPU's memory on CUDA
    and this host's RAM shared by its ranks (``LOCAL_WORLD_SIZE``) on CPU."""
    import os

    import torch

    if spec != "auto":
        return parse_bytes(spec)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_fits(plan: MemoryPlan, what: str) -> None:
    """ValueError naming the numbers and the fix when ``plan`` does not fit."""
    if plan.fits:
        return
    raise ValueError(
        f"{what} needs {human_bytes(plan.total_bytes)} per rank (weights "
        f"{human_bytes(plan.weight_bytes)}, KV cache {human_bytes(plan.kv_cache_bytes)}, "
        f"activations {human_bytes(plan.activation_bytes)}) but a rank has "
        f"{human_bytes(plan.device_bytes)} (--device-memory): raise --cp or --tp, shorten the "
        "prompts or lower --max-new-tokens, or use --quant fp8 (python -m cp_infer plan-memory "
        "shows the budget)"
    )


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"
