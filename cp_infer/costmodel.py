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
comes out right (within 5%). The 1M point (77 s) is then a prediction, and lands within 5%
too (both tested).

A profile measured by ``python -m cp_infer calibrate`` maps onto the same model
(:meth:`ClusterProfile.from_calibration`): one CPU rank stands for one "GPU" and for one CP rank
(``tp=1``), fp32 (4 bytes per element), its measured GEMM FLOP/s is the peak with
``gemm_utilization=1`` (a measurement is already an achieved rate), and attention runs at the
measured attention/GEMM ratio. :func:`predict_benchmark` is then the model's forecast of
``tools/bench_model.py`` on that machine.

Every record also carries Alg. 1's predicted pass-KV / pass-Q crossover at its context
(:func:`predicted_crossover`, from :func:`cp_infer.attention.selector.crossover_miss_rate`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cp_infer.attention.selector import Hardware, crossover_miss_rate
from cp_infer.models.config import ModelConfig

__all__ = [
    "PROFILES",
    "ClusterProfile",
    "PlanRecord",
    "cluster_profile",
    "plan_prefill",
    "predict_benchmark",
    "predicted_crossover",
]

logger = logging.getLogger(__name__)

# What a calibrated profile must hold, and what an older calibrate did not write.
_CALIBRATED = ("attention_flops", "gemm_flops", "ring_bandwidth", "ring_latency_s")
# A single core's streaming read, for profiles written before calibrate measured it.
_FALLBACK_MEMORY_BANDWIDTH = 10e9


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
        tp: the natural TP size, devices per CP rank: 8 GPUs of a host; 1 for a CPU rank.
        bytes_per_element: the model's dtype there: 2 (BF16) on the GPUs, 4 (fp32) on CPU.
    """

    peak_flops: float
    link_bytes_s: float
    link_latency_s: float
    hbm_bytes_s: float
    memory_bytes: float
    gemm_utilization: float = 0.385
    attention_utilization: float = 540 / 800
    tp: int = 8
    bytes_per_element: int = 2

    def __post_init__(self) -> None:
        for key in ("peak_flops", "link_bytes_s", "hbm_bytes_s", "memory_bytes",
                    "gemm_utilization", "attention_utilization", "tp", "bytes_per_element"):  # fmt: skip
            if not getattr(self, key) > 0:
                raise ValueError(f"ClusterProfile.{key} must be > 0, got {getattr(self, key)}")
        if not self.link_latency_s >= 0:
            raise ValueError(
                f"ClusterProfile.link_latency_s must be >= 0, got {self.link_latency_s}"
            )

    def selector_hardware(self) -> Hardware:
        """Alg. 1's C and BW for one rank: the achieved attention FLOP/s and the link.

        For a calibrated profile this is :meth:`Hardware.from_profile` of the same file, what
        ``generate --hardware PATH`` weighs. (The selector's built-in ``h100-*`` profiles take
        the 800 TF/s peak as C instead, the paper's starting point.)
        """
        return Hardware(flops=self.peak_flops * self.attention_utilization,
                        bandwidth=self.link_bytes_s)  # fmt: skip

    @classmethod
    def from_calibration(cls, path: str | Path) -> ClusterProfile:
        """The profile ``python -m cp_infer calibrate --output PATH`` measured, as a cluster.

        One rank is one device and one CP rank (``tp=1``), fp32. ``gemm_flops`` becomes the
        peak with ``gemm_utilization=1``; ``attention_utilization`` is attention/GEMM FLOP/s;
        the ring's bandwidth and latency are the link; ``memory_bandwidth`` is the HBM
        bandwidth (older profiles lack it: 10 GB/s, with a warning); ``host_memory_bytes``, or
        this machine's RAM, the memory.

        Raises:
            ValueError: the file cannot be read, is not JSON, or lacks a positive figure; the
                message names the fix (run calibrate).
        """
        path = Path(path)
        fix = f"measure this machine with `python -m cp_infer calibrate --output {path}`"

        def refuse(why: str) -> ValueError:
            return ValueError(
                f"--hardware {path}: not a profile from `python -m cp_infer calibrate` ({why}); "
                + fix
            )

        try:
            profile = json.loads(path.read_text())
        except OSError as e:
            raise refuse(f"cannot read it: {e.strerror or e}") from None
        except ValueError as e:
            raise refuse(f"not JSON: {e}") from None
        if not isinstance(profile, dict):
            raise refuse(f"a JSON {type(profile).__name__}, not an object")
        missing = [k for k in _CALIBRATED if k not in profile]
        if missing:
            raise refuse(f"it lacks {', '.join(missing)}")
        if "memory_bandwidth" not in profile:
            logger.warning(
                "%s has no memory_bandwidth (an older calibrate): decode assumes %.0f GB/s; %s",
                path, _FALLBACK_MEMORY_BANDWIDTH / 1e9, fix,
            )  # fmt: skip
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        figures = {
            **{k: profile[k] for k in _CALIBRATED},
            "memory_bandwidth": profile.get("memory_bandwidth", _FALLBACK_MEMORY_BANDWIDTH),
            "host_memory_bytes": profile.get("host_memory_bytes", ram),
        }
        for key, value in figures.items():
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:
                raise refuse(f"{key} must be a number > 0, got {value!r}")
        return cls(
            peak_flops=figures["gemm_flops"], gemm_utilization=1.0,
            attention_utilization=figures["attention_flops"] / figures["gemm_flops"],
            link_bytes_s=figures["ring_bandwidth"], link_latency_s=figures["ring_latency_s"],
            hbm_bytes_s=figures["memory_bandwidth"], memory_bytes=figures["host_memory_bytes"],
            tp=1, bytes_per_element=4,
        )  # fmt: skip


# The paper's hosts: 8 power-limited H100 (800 TF/s BF16, 96 GB at 2.4 TB/s), RDMA 400 Gb/s or
# TCP 100 Gb/s per GPU between hosts (PAPER_FACTS.md).
_H100 = dict(peak_flops=800e12, hbm_bytes_s=2.4e12, memory_bytes=96e9)
PROFILES = {
    "h100-rdma": ClusterProfile(**_H100, link_bytes_s=400e9 / 8, link_latency_s=10e-6),
    "h100-tcp": ClusterProfile(**_H100, link_bytes_s=100e9 / 8, link_latency_s=50e-6),
}


def cluster_profile(spec: str | Path) -> ClusterProfile:
    """``--hardware NAME|PATH``: a built-in profile by name, or a calibrated JSON file."""
    if str(spec) in PROFILES:
        return PROFILES[str(spec)]
    if not Path(spec).is_file():
        raise ValueError(
            f"--hardware {str(spec)!r} is neither a built-in profile ({', '.join(sorted(PROFILES))})"
            " nor a file: measure one with `python -m cp_infer calibrate --output FILE`"
        )
    return ClusterProfile.from_calibration(spec)


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
    crossover_miss_rate: float  # Alg. 1 at this context: pass-Q below this miss rate
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


def predicted_crossover(
    cfg: ModelConfig, prof: ClusterProfile, *, cp: int, context: int, tp: int | None = None,
    bytes_per_element: int | None = None,
) -> float:  # fmt: skip
    """The miss rate T/(T+P) below which Alg. 1 picks pass-Q for ``context`` = T+P tokens.

    :func:`~cp_infer.attention.selector.crossover_miss_rate` with the model's heads and the
    profile's :meth:`~ClusterProfile.selector_hardware`; ``tp`` and ``bytes_per_element``
    default to the profile's.
    """
    return crossover_miss_rate(
        context, cp=cp, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
        bytes_per_element=bytes_per_element or prof.bytes_per_element,
        hardware=prof.selector_hardware(), tp=tp or prof.tp,
    )  # fmt: skip


def plan_prefill(
    cfg: ModelConfig, prof: ClusterProfile, *, cp: int, context: int, tp: int | None = None,
    bytes_per_element: int | None = None,
) -> PlanRecord:  # fmt: skip
    """TTFT, TTIT and the per-layer split of one ``context``-token prompt on ``cp`` hosts.

    ``tp`` and ``bytes_per_element`` default to the profile's (8 and 2 for the H100 hosts, 1
    and 4 for a calibrated CPU profile).
    """
    tp, e = tp or prof.tp, bytes_per_element or prof.bytes_per_element
    if cp < 1 or tp < 1 or context < 1 or e < 1:
        raise ValueError(f"cp, tp, context and bytes_per_element must be >= 1, got "
                         f"{cp}, {tp}, {context}, {e}")  # fmt: skip
    gemm, attn, comm = _prefill(cfg, prof, cp=cp, tp=tp, t=context, e=e)
    ttft = cfg.n_layers * (gemm + attn + comm)
    g1, a1, c1 = _prefill(cfg, prof, cp=1, tp=tp, t=context, e=e)
    ttft1 = cfg.n_layers * (g1 + a1 + c1)
    weights = cfg.n_params() * e / tp
    kv = 2 * cfg.n_layers * (context / cp) * cfg.head_dim * e * max(
        1, cfg.n_kv_heads // tp
    )  # fmt: skip
    # decode: each GPU reads its weights and its share of the cache once per token; a ring
    # latency per layer for the exchange of partial attention (KV-cache parallelism)
    ttit = (weights + kv) / prof.hbm_bytes_s + cfg.n_layers * (
        (cp > 1) * prof.link_latency_s * 2
    )  # fmt: skip
    crossover = predicted_crossover(cfg, prof, cp=cp, context=context, tp=tp, bytes_per_element=e)
    return PlanRecord(
        cp=cp, tp=tp, context=context, ttft_s=ttft, ttit_s=ttit, variant="pass-kv",
        efficiency=ttft1 / (cp * ttft), crossover_miss_rate=crossover, gemm_s_per_layer=gemm,
        attention_s_per_layer=attn, comm_s_per_layer=comm, memory_bytes_per_gpu=weights + kv,
    )  # fmt: skip


def predict_benchmark(
    cfg: ModelConfig, prof: ClusterProfile, *, cp: int, prompt_tokens: int
) -> PlanRecord:
    """The model's forecast of one ``tools/bench_model.py`` row on a calibrated CPU machine.

    That benchmark runs every CP rank as one single-threaded gloo process (``tp=1``) in fp32,
    pass-KV prefill of one prompt, then decode; ``ttft_s`` and ``ttit_s`` of the record are
    its TTFT and TTIT. The decode exchange is charged two ring latencies per layer, gloo's
    (``--decode-exchange collective``); the shared-memory exchange is faster.
    """
    return plan_prefill(cfg, prof, cp=cp, tp=1, context=prompt_tokens, bytes_per_element=4)
