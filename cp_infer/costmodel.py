"""A first-principles cost model of context-parallel prefill and decode (the ``plan`` command).

The layout is the paper's (§4): TP inside a host of ``tp`` GPUs, CP across hosts, one ring per KV
head. Per layer and CP rank (one host):

- **GEMMs**: ``2 * W_layer * T / cp`` FLOPs (appendix A), run by the host's ``tp`` GPUs at
  ``gemm_utilization`` of their peak. That one parameter stands for everything a GEMM step costs
  beyond its FLOPs at peak: TP all-reduces, FP8/BF16 mix, norms, launch gaps.
- **attention**: ``1/2 * 4 * T^2 * D / cp`` FLOPs (causal; ``D = n_heads * head_dim``), balanced
  by the 2N-chunk layout, at ``attention_utilization`` of peak (the paper's single-GPU FA3
  figure: 540 of 800 TF/s).
- **ring**: pass-KV moves ``N - 1`` KV shards per layer, ``T / cp`` tokens of one KV head per GPU,
  K and V, at the profile's per-GPU bandwidth. Each step is hidden behind that step's attention
  except for what exceeds it, plus the link latency.

TTFT is the layers' sum. Decode (TTIT) reads the host's share of the weights and KV cache from
HBM once per token and pays a ring latency per layer; it is a floor, not a fit.

The default utilizations come from the paper. ``attention_utilization`` = 540/800 is its
measurement. ``gemm_utilization`` = 0.385 is chosen so that the 128K point (3.8 s on 16 hosts)
comes out right. The 1M point (77 s) is then a prediction, and lands within 5% (tested).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cp_infer.models.config import ModelConfig

__all__ = ["PROFILES", "ClusterProfile", "PlanRecord", "plan_prefill"]


@dataclass(frozen=True, kw_only=True)
class ClusterProfile:
    """One GPU's speeds and its host.

    Attributes:
        peak_flops: dense BF16 FLOP/s of one GPU.
        link_bytes_s: bandwidth between hosts, per GPU.
        link_latency_s: one SendRecv's latency between hosts.
        hbm_bytes_s: one GPU's memory bandwidth.
        memory_bytes: one GPU's memory.
        gemm_utilization: achieved share of peak in a layer's GEMMs (see the module docstring).
        attention_utilization: achieved share of peak in attention.
    """

    peak_flops: float
    link_bytes_s: float
    link_latency_s: float
    hbm_bytes_s: float
    memory_bytes: float
    gemm_utilization: float = 0.385
    attention_utilization: float = 540 / 800


# The paper's hosts: 8 power-limited H100 (800 TF/s BF16, 96 GB at 2.4 TB/s), RDMA 400 Gb/s or
# TCP 100 Gb/s per GPU between hosts (PAPER_FACTS.md).
_H100 = dict(peak_flops=800e12, hbm_bytes_s=2.4e12, memory_bytes=96e9)
PROFILES = {
    "h100-rdma": ClusterProfile(**_H100, link_bytes_s=400e9 / 8, link_latency_s=10e-6),
    "h100-tcp": ClusterProfile(**_H100, link_bytes_s=100e9 / 8, link_latency_s=50e-6),
}


@dataclass(frozen=True)
class PlanRecord:
    """What a layout does with one prompt (the ``plan`` command's rows)."""

    cp: int
    tp: int
    context: int
    ttft_s: float
    ttit_s: float
    variant: str
    efficiency: float  # TTFT at CP=1 / (cp * TTFT): 1.0 is perfect scaling
    gemm_s_per_layer: float
    attention_s_per_layer: float
    comm_s_per_layer: float  # ring communication not hidden behind attention
    memory_bytes_per_gpu: float

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_weights(cfg: ModelConfig) -> float:
    d, hd = cfg.dim, cfg.head_dim
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    ffn = 3 * d * cfg.ffn_dim * (cfg.top_k if cfg.is_moe else 1)  # FLOPs see the active experts
    return attn + ffn


def _prefill(cfg: ModelConfig, prof: ClusterProfile, *, cp: int, tp: int, t: int, e: int):
    per_host = tp * prof.peak_flops
    gemm = 2 * _layer_weights(cfg) * t / cp / (per_host * prof.gemm_utilization)
    attn = 0.5 * 4 * t * t * cfg.n_heads * cfg.head_dim / cp / (
        per_host * prof.attention_utilization
    )  # fmt: skip
    comm = 0.0
    if cp > 1:  # pass-KV: N-1 steps, each a KV shard (one KV head per GPU, K and V)
        shard = 2 * (t / cp) * cfg.head_dim * e * max(1, cfg.n_kv_heads // tp)
        step = shard / prof.link_bytes_s + prof.link_latency_s
        comm = (cp - 1) * max(0.0, step - attn / cp)
    return gemm, attn, comm


def plan_prefill(
    cfg: ModelConfig, prof: ClusterProfile, *, cp: int, tp: int, context: int,
    bytes_per_element: int = 2,
) -> PlanRecord:  # fmt: skip
    """TTFT, TTIT and the per-layer split of one ``context``-token prompt on ``cp`` hosts."""
    gemm, attn, comm = _prefill(cfg, prof, cp=cp, tp=tp, t=context, e=bytes_per_element)
    ttft = cfg.n_layers * (gemm + attn + comm)
    g1, a1, c1 = _prefill(cfg, prof, cp=1, tp=tp, t=context, e=bytes_per_element)
    ttft1 = cfg.n_layers * (g1 + a1 + c1)
    weights = cfg.n_params() * bytes_per_element / tp
    kv = 2 * cfg.n_layers * (context / cp) * cfg.head_dim * bytes_per_element * max(
        1, cfg.n_kv_heads // tp
    )  # fmt: skip
    # decode: each GPU reads its weights and its share of the cache once per token; a ring
    # latency per layer for the exchange of partial attention (KV-cache parallelism)
    ttit = (weights + kv) / prof.hbm_bytes_s + cfg.n_layers * (
        (cp > 1) * prof.link_latency_s * 2
    )  # fmt: skip
    return PlanRecord(
        cp=cp, tp=tp, context=context, ttft_s=ttft, ttit_s=ttit, variant="pass-kv",
        efficiency=ttft1 / (cp * ttft), gemm_s_per_layer=gemm, attention_s_per_layer=attn,
        comm_s_per_layer=comm, memory_bytes_per_gpu=weights + kv,
    )  # fmt: skip
