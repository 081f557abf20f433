"""One hardware model: the machines, what every phase of inference costs on them, and why.

Every prediction in the project comes from here: the Alg. 1 selector's C and BW
(:meth:`Profile.selector`), the server's chunk sizing (:class:`~cp_infer.engine.chunking.
StepCosts`), ``plan`` (:mod:`cp_infer.costmodel`) and ``plan-memory``'s devices. A name that is
no profile is an error everywhere (:func:`profile`).

**The counts** (appendix A of the paper), per layer: GEMMs ``2 * W_layer * T`` FLOPs
(:func:`gemm_flops`, the active experts of an MoE), attention ``4 * T * (P + T / 2) * H * D``
for T new tokens over P cached (:func:`attention_flops`: half of the new-new pairs, causal).

**The mechanisms**, per layer and CP rank (a host of ``tp`` devices), each a function of the
profile's figures:

- *GEMM and attention* at an achieved share of peak (``gemm_utilization``,
  ``attention_utilization``), or a CPU's measured rates by model width, head size and the
  tokens of a kernel call (short calls run slower); FP8 FFN weights run at ``fp8_speedup``
  times the BF16 rate.
- *Elementwise passes* between the kernels (norms, RoPE, SwiGLU's product, residual adds): the
  elements they move (:func:`activation_elements`) at a CPU's measured rate; GPUs fuse them.
- *TP all-reduce* of the activations, twice a layer: NVLink inside a host; across hosts a ring
  over the host's rails at the link's bandwidth, and a tree's latency (:func:`all_reduce_s`).
- *The ring*: N-1 steps, each a SendRecv (pass-KV: the K/V shard and its share of the cached
  prefix; pass-Q: the query shard) at the link's bandwidth, plus its latency and the fixed cost
  of a prefill collective across hosts (``collective_s``). A step hides behind that step's
  attention up to the profile's ``overlap``; what is left is exposed (short per-rank chunks at
  high CP, a small new-token count over a long prefix).
- *pass-Q's All2All* on the critical path (appendix C): the partial outputs and LSE of the
  visiting queries go home, ``(N-1)/N`` of them, plus a collective's fixed cost.
- *Decode* reads this device's weights and its share of the KV cache once per token
  (``hbm_bytes_s``: achieved), all-reduces twice a layer, and under CP pays N-1 SendRecv
  latencies and an All2All latency per layer: it grows with CP (Table 8).

**The figures** of the paper's hosts are published measurements, specs, or one of the two
fitted constants (see :data:`PROFILES`). A CPU machine's come from ``python -m cp_infer
calibrate`` (:meth:`Profile.from_calibration`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cp_infer.models.config import ModelConfig

__all__ = [
    "PROFILES",
    "PhaseTimes",
    "Profile",
    "activation_elements",
    "all_reduce_s",
    "attention_flops",
    "decode_s",
    "faster_variant",
    "gemm_flops",
    "hardware_for",
    "layer_weights",
    "pair_flops",
    "prefill_layer",
    "profile",
]

logger = logging.getLogger(__name__)

# What a calibrated profile must hold, and what an older calibrate did not write.
_CALIBRATED = ("attention_flops", "gemm_flops", "ring_bandwidth", "ring_latency_s")
_FALLBACK_MEMORY_BANDWIDTH = 10e9  # a single core's streaming read, for older profiles


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One device, its host and the links between hosts.

    Attributes:
        name: the profile's name (a built-in one, or the calibrated file).
        peak_flops: dense FLOP/s of one device in the model's dtype (BF16 on a GPU).
        gemm_utilization: achieved share of peak in a layer's GEMMs.
        attention_utilization: achieved share of peak in attention.
        fp8_speedup: how much faster FP8 GEMMs run than ``peak_flops``'s dtype.
        link_bytes_s: achieved bandwidth between CP ranks (hosts), per device.
        link_latency_s: one SendRecv's latency between CP ranks.
        all2all_latency_s: one All2All's latency between CP ranks.
        collective_s: the fixed cost of one prefill collective between CP ranks (a ring step
            or an All2All), beyond its latency; decode's run under CUDA graphs and do not pay
            it. A calibrated profile's is its ``ring_step_s``, as the engine's ring runs.
        overlap: the share of a ring step's communication that hides behind its attention (1
            on GPUs: separate engines; lower on a CPU, whose loopback copies take the cores).
        intra_bytes_s: bandwidth between the devices of a host (NVLink), per device.
        intra_latency_s: a small all-reduce inside a host.
        hbm_bytes_s: achieved memory bandwidth of one device (decode's weight and KV reads).
        memory_bytes: one device's memory.
        devices_per_host: devices a host holds (TP beyond it crosses hosts).
        bytes_per_element: the model's dtype there: 2 (BF16) on GPUs, 4 (fp32) on a CPU.
        attention_rates: measured (head dim, tokens, FLOP/s) of attention, where the kernel's
            rate depends on the head size (a CPU's: 16-dim heads run at half the rate of 128)
            and on the queries of a call (short calls pay the causal diagonal's and the tiles'
            overheads on fewer pairs); between two, interpolated in log(tokens), then in
            log(head dim). Empty: ``attention_flops_s``.
        gemm_rates: measured (model dim, FLOP/s) of a layer's GEMMs, likewise.
        gemm_row_rates: measured (rows, FLOP/s) of the engine's linears over a few rows at a
            time (weights larger than the caches): a short prompt's GEMMs, slower per FLOP.
        gemv_bytes_s: decode's weight reads, one-row GEMMs (None: ``hbm_bytes_s``).
        decode_kv_bytes_s: decode attention's reads of the KV cache (None: ``hbm_bytes_s``).
        decode_layer_s, decode_step_s: the fixed cost of a decode step's layer and of the
            step itself beyond what they read (kernel calls, the engine's bookkeeping, sampling);
            a CPU's, measured on a small model by ``calibrate``; 0 on GPUs, whose decode runs
            as CUDA graphs.
        decode_cp_layer_s, decode_cp_step_s: the same under CP, the engine's exchanges among
            the CP ranks included (its KVP exchange of attention partials and the gathers of
            the token split), measured at the calibrated world size (None: the paper's batched
            pass-Q, N-1 SendRecv latencies and an All2All's a layer, on top of the above).
        activation_bytes_s: the rate at which a prefill's elementwise passes over activations
            (norms, RoPE, SwiGLU's product, residual adds, the cache store: see
            :func:`activation_elements`) move bytes: a CPU runs each as its own kernel over
            fresh memory. None: not modelled (GPUs fuse them into the GEMMs and attention).
    """

    name: str
    peak_flops: float
    gemm_utilization: float
    attention_utilization: float
    fp8_speedup: float = 1.0
    link_bytes_s: float
    link_latency_s: float
    all2all_latency_s: float
    collective_s: float = 0.0
    overlap: float = 1.0
    intra_bytes_s: float
    intra_latency_s: float
    hbm_bytes_s: float
    memory_bytes: float
    devices_per_host: int = 8
    bytes_per_element: int = 2
    attention_rates: tuple[tuple[float, float, float], ...] = ()
    gemm_rates: tuple[tuple[float, float], ...] = ()
    gemm_row_rates: tuple[tuple[float, float], ...] = ()
    gemv_bytes_s: float | None = None
    decode_kv_bytes_s: float | None = None
    decode_layer_s: float = 0.0
    decode_step_s: float = 0.0
    decode_cp_layer_s: float | None = None
    decode_cp_step_s: float | None = None
    activation_bytes_s: float | None = None

    def __post_init__(self) -> None:
        for key in ("peak_flops", "gemm_utilization", "attention_utilization", "fp8_speedup",
                    "link_bytes_s", "intra_bytes_s", "hbm_bytes_s", "memory_bytes",
                    "devices_per_host", "bytes_per_element"):  # fmt: skip
            if not getattr(self, key) > 0:
                raise ValueError(f"Profile.{key} must be > 0, got {getattr(self, key)}")
        for key in ("link_latency_s", "all2all_latency_s", "collective_s", "intra_latency_s",
                    "decode_layer_s", "decode_step_s"):  # fmt: skip
            if not getattr(self, key) >= 0:
                raise ValueError(f"Profile.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"Profile.overlap must be in [0, 1], got {self.overlap}")

    @property
    def gemm_flops_s(self) -> float:
        return self.peak_flops * self.gemm_utilization

    @property
    def attention_flops_s(self) -> float:
        return self.peak_flops * self.attention_utilization

    def attention_flops_s_at(self, head_dim: int, tokens: float | None = None) -> float:
        """Attention's achieved FLOP/s for heads of ``head_dim`` in calls of ``tokens``
        queries (None: the longest measured)."""
        by_dim: dict[float, list[tuple[float, float]]] = {}
        for d, t, rate in self.attention_rates:
            by_dim.setdefault(d, []).append((t, rate))
        rates = [
            (d, _interpolate(rows, tokens, max(rows)[1]) if tokens else max(rows)[1])
            for d, rows in by_dim.items()
        ]
        return _interpolate(rates, head_dim, self.attention_flops_s)

    def gemm_flops_s_at(self, dim: int, rows: float | None = None) -> float:
        """A layer's GEMMs' achieved FLOP/s for a model of width ``dim``, over ``rows`` tokens
        (a few rows run slower: a calibrated profile's :attr:`gemm_row_rates`)."""
        rate = _interpolate(self.gemm_rates, dim, self.gemm_flops_s)
        if rows is not None and self.gemm_row_rates:
            rate = min(rate, _interpolate(self.gemm_row_rates, max(rows, 1.0), rate))
        return rate

    def selector(self):
        """Alg. 1's C and BW for one rank: the achieved attention FLOP/s and link bandwidth."""
        from cp_infer.attention.selector import Hardware

        return Hardware(flops=self.attention_flops_s, bandwidth=self.link_bytes_s)

    @classmethod
    def from_calibration(cls, path: str | Path) -> Profile:
        """The profile ``python -m cp_infer calibrate --output PATH`` measured on this machine.

        One rank is one device, one host and one CP rank (``devices_per_host=1``), fp32. The
        GEMM rate is the peak (``gemm_utilization=1``: a measurement is already achieved);
        attention runs at the measured attention/GEMM ratio; the ring's bandwidth and latency
        are the link (and the intra-host link: there is none); ``all2all_s`` less the time of
        the bytes it sends is the All2All latency (at least a SendRecv's); ``overlap`` is the measured share of a ring step
        that hides behind attention (1 for an older profile, with a warning); the rates by
        head and model size, the one-row GEMM and decode-attention bandwidths and a kernel
        call's latency, when measured, are the CPU's shape and decode terms.

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
            data = json.loads(path.read_text())
        except OSError as e:
            raise refuse(f"cannot read it: {e.strerror or e}") from None
        except ValueError as e:
            raise refuse(f"not JSON: {e}") from None
        if not isinstance(data, dict):
            raise refuse(f"a JSON {type(data).__name__}, not an object")
        missing = [k for k in _CALIBRATED if k not in data]
        if missing:
            raise refuse(f"it lacks {', '.join(missing)}")
        for key in ("memory_bandwidth", "overlap"):
            if key not in data:
                logger.warning("%s has no %s (an older calibrate): %s", path, key, fix)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        figures = {
            **{k: data[k] for k in _CALIBRATED},
            "memory_bandwidth": data.get("memory_bandwidth", _FALLBACK_MEMORY_BANDWIDTH),
            "host_memory_bytes": data.get("host_memory_bytes", ram),
        }
        for key, value in {**figures, "overlap": data.get("overlap", 1.0)}.items():
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < 0 or (value == 0 and key in figures):
                raise refuse(f"{key} must be a number > 0, got {value!r}")
        bw, lat = figures["ring_bandwidth"], figures["ring_latency_s"]
        # an All2All of B bytes per rank sends (world - 1) / world of them: the rest is latency
        world = data.get("world", 2)
        sent = (world - 1) / world * data.get("all2all_bytes", 0)
        a2a_latency = max(lat, data.get("all2all_s", lat) - sent / bw)

        def table(key: str) -> tuple[tuple[float, float], ...]:
            rows = data.get(key, {})
            try:
                out = tuple(sorted((float(k), float(v)) for k, v in rows.items()))
            except (AttributeError, TypeError, ValueError):
                raise refuse(f"{key} must map sizes to FLOP/s") from None
            if any(not (k > 0 and v > 0) for k, v in out):
                raise refuse(f"{key} must map sizes to FLOP/s > 0")
            return out

        def attention_table() -> tuple[tuple[float, float, float], ...]:
            # {head dim: {tokens: FLOP/s}}; an older calibrate wrote {head dim: FLOP/s}, at
            # its --tokens
            rows = data.get("attention_flops_by_head_dim", {})
            if not isinstance(rows, dict):
                raise refuse("attention_flops_by_head_dim must map head sizes to FLOP/s")
            out = []
            for d, by_tokens in rows.items():
                if not isinstance(by_tokens, dict):
                    by_tokens = {data.get("tokens", 4096): by_tokens}
                out += [(d, t, rate) for t, rate in by_tokens.items()]
            try:
                out = sorted(tuple(float(x) for x in row) for row in out)
            except (TypeError, ValueError):
                raise refuse("attention_flops_by_head_dim must map sizes to FLOP/s") from None
            if any(not (x > 0) for row in out for x in row):
                raise refuse("attention_flops_by_head_dim must map sizes to FLOP/s > 0")
            return tuple(out)

        def optional(key: str, zero: bool = False) -> float | None:
            value = data.get(key)
            ok = isinstance(value, int | float) and (value >= 0 if zero else value > 0)
            if value is not None and not ok:
                raise refuse(f"{key} must be a number {'>=' if zero else '>'} 0, got {value!r}")
            return value

        return cls(
            name=str(path), peak_flops=figures["gemm_flops"], gemm_utilization=1.0,
            attention_utilization=figures["attention_flops"] / figures["gemm_flops"],
            link_bytes_s=bw, link_latency_s=lat, all2all_latency_s=a2a_latency,
            overlap=min(1.0, float(data.get("overlap", 1.0))), intra_bytes_s=bw,
            intra_latency_s=lat, hbm_bytes_s=figures["memory_bandwidth"],
            memory_bytes=figures["host_memory_bytes"], devices_per_host=1, bytes_per_element=4,
            attention_rates=attention_table(),
            gemm_rates=table("gemm_flops_by_dim"), gemv_bytes_s=optional("gemv_bandwidth"),
            gemm_row_rates=table("gemm_flops_by_rows"),
            decode_kv_bytes_s=optional("decode_kv_bandwidth"),
            decode_layer_s=optional("decode_layer_s", zero=True) or 0.0,
            decode_step_s=optional("decode_step_s", zero=True) or 0.0,
            decode_cp_layer_s=optional("decode_cp_layer_s", zero=True),
            decode_cp_step_s=optional("decode_cp_step_s", zero=True),
            activation_bytes_s=optional("activation_bandwidth"),
            collective_s=optional("ring_step_s", zero=True) or 0.0,
        )  # fmt: skip


def _interpolate(table, x: float, default: float) -> float:
    """``table``'s (key, value) at ``x``, log-linear between keys, clamped at the ends."""
    if not table:
        return default
    table = sorted(table)
    if x <= table[0][0]:
        return table[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(table):
        if x <= x1:
            w = math.log(x / x0) / math.log(x1 / x0)
            return y0 + w * (y1 - y0)
    return table[-1][1]


# The paper's hosts (§4.1, PAPER_FACTS.md): 8 power-limited H100 each, BF16 peak taken as
# 800 TF/s, 96 GB of HBM. Every figure is published or a spec, but two, fitted:
#  - gemm_utilization 0.445: fitted to the CP1 128K prefill of Llama 3 405B (42.01 s, Table 7);
#  - collective_s 0.9 ms: fitted to the CP16 128K prefill (3.8 s, §4.2.3).
# The others: attention at 540 of 800 TF/s (FA3 alone on one GPU, appendix A); FP8 at twice
# BF16 (H100 spec); RDMA achieved 25 GB/s per GPU (Table 5: a 16.4 MB KV shard in 627-631 us,
# a 13 MB query shard in 544 us); TCP achieved about 3 GB/s per rank (§4.2.1); a SendRecv's
# latency 35 us and an All2All's 80 us between hosts (Table 8's decode: 32.3 us for one step,
# 105.7 us for three; 66.8-81.1 us); HBM achieved 1.73 TB/s (Table 8: flash decoding reads a
# layer's 67 MB of KV in 38.9 us); NVLink 450 GB/s per direction (H100 spec) and 10 us for a
# small all-reduce inside a host (an assumption: no figure is published).
_H100 = dict(
    peak_flops=800e12, gemm_utilization=0.445, attention_utilization=540 / 800, fp8_speedup=2.0,
    link_latency_s=35e-6, all2all_latency_s=80e-6, collective_s=0.9e-3, intra_bytes_s=450e9,
    intra_latency_s=10e-6, hbm_bytes_s=1.73e12, memory_bytes=96e9, devices_per_host=8,
    bytes_per_element=2,
)  # fmt: skip
# This project's CPU machine, one single-threaded gloo rank per CP rank, fp32: the order of
# what `calibrate` measures here (docs/performance.md); a calibrated file is better.
_CPU = Profile(
    name="cpu-gloo", peak_flops=85e9, gemm_utilization=1.0, attention_utilization=0.85,
    link_bytes_s=1.5 * 2**30, link_latency_s=60e-6, all2all_latency_s=120e-6, overlap=0.5,
    intra_bytes_s=1.5 * 2**30, intra_latency_s=60e-6, hbm_bytes_s=10e9, memory_bytes=12e9,
    devices_per_host=1, bytes_per_element=4,
)  # fmt: skip
PROFILES: dict[str, Profile] = {
    "h100-rdma": Profile(name="h100-rdma", link_bytes_s=25e9, **_H100),
    "h100-tcp": Profile(name="h100-tcp", link_bytes_s=3e9, **_H100),
    "cpu-gloo": _CPU,
}


def profile(spec: str | Path) -> Profile:
    """``--hardware NAME|PATH``: a built-in profile by name, or a calibrated JSON file; any
    other name is an error naming the choices."""
    if str(spec) in PROFILES:
        return PROFILES[str(spec)]
    if not Path(spec).is_file():
        raise ValueError(
            f"--hardware {str(spec)!r} is neither a built-in profile ({', '.join(sorted(PROFILES))})"
            " nor a file: measure one with `python -m cp_infer calibrate --output FILE`"
        )
    return Profile.from_calibration(spec)


def hardware_for(device) -> Profile:
    """The built-in profile of a device: the paper's H100 over RDMA for CUDA, else this CPU."""
    import torch

    return PROFILES["h100-rdma" if torch.device(device).type == "cuda" else "cpu-gloo"]


# -- counts (appendix A) ---------------------------------------------------------------------------
def layer_weights(cfg: ModelConfig) -> tuple[int, int]:
    """(attention, FFN) weights of one layer a token goes through (an MoE's active experts)."""
    d, hd = cfg.dim, cfg.head_dim
    attention = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    ffn = 3 * d * cfg.ffn_dim * (cfg.top_k if cfg.is_moe else 1)
    return attention, ffn


def gemm_flops(cfg: ModelConfig, tokens: float) -> float:
    """FLOPs of one layer's GEMMs over ``tokens`` tokens: ``2 * W_layer * T``."""
    return 2 * sum(layer_weights(cfg)) * tokens


def activation_elements(cfg: ModelConfig, tp: int = 1) -> float:
    """Elements one token's elementwise passes read and write in one layer (each op's inputs
    and output, as the model runs them): two RMSNorms (a square, a mean, two products: 7 x dim
    each), RoPE on the queries and keys (negation, concatenation, two products and a sum: 10
    x their width), the cache store of K and V, the queries' and the output's layout copies, two
    residual adds (3 x dim each), and SwiGLU's SiLU and product (5 x ffn_dim); an MoE's per
    active expert, with its gather, weighting and scatter-add (7 x dim). Under TP the heads and
    the FFN are split, the norms and residual adds are not."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    ffn = 5 * cfg.ffn_dim + (7 * cfg.dim if cfg.is_moe else 0)
    return 20 * cfg.dim + (14 * q + 14 * kv + ffn * (cfg.top_k if cfg.is_moe else 1)) / tp


def pair_flops(cfg: ModelConfig) -> float:
    """FLOPs of one (query, key) pair in one layer's attention: ``4 * H * D`` (QK^T and PV)."""
    return 4 * cfg.n_heads * cfg.head_dim


def attention_flops(cfg: ModelConfig, new: float, cached: float = 0.0) -> float:
    """FLOPs of one layer's attention: ``new`` queries over ``cached`` keys and, causally, over
    each other (``1/2 * 4 * T^2 * D`` for a full prefill, appendix A)."""
    return new * (cached + new / 2) * pair_flops(cfg)


# -- times -----------------------------------------------------------------------------------------
def all_reduce_s(prof: Profile, nbytes: float, tp: int) -> float:
    """One all-reduce of ``nbytes`` over ``tp`` devices: NVLink inside a host; across hosts a
    ring over the host's rails (each device's NIC carries ``1/devices_per_host`` of it) and a
    tree's latency, ``2 * ceil(log2(hosts))`` link latencies."""
    if tp <= 1:
        return 0.0
    host = min(tp, prof.devices_per_host)
    hosts = math.ceil(tp / prof.devices_per_host)
    t = 2 * (host - 1) / host * nbytes / prof.intra_bytes_s + prof.intra_latency_s * (host > 1)
    if hosts > 1:
        share = nbytes / host
        t += 2 * (hosts - 1) / hosts * share / prof.link_bytes_s
        t += 2 * math.ceil(math.log2(hosts)) * prof.link_latency_s
    return t


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds of one layer on one CP rank, by what costs them (their sum is the layer)."""

    gemm: float = 0.0
    attention: float = 0.0
    tp_comm: float = 0.0  # the two TP all-reduces
    ring_exposed: float = 0.0  # the ring's communication not hidden behind attention
    all2all: float = 0.0  # pass-Q's return trip (on the critical path)
    memory: float = 0.0  # decode: reading the weights and the KV cache
    elementwise: float = 0.0  # prefill: the passes over activations between the GEMMs

    @property
    def total(self) -> float:
        return (self.gemm + self.attention + self.tp_comm + self.ring_exposed + self.all2all
                + self.memory + self.elementwise)  # fmt: skip


def _heads(cfg: ModelConfig, tp: int) -> tuple[float, int]:
    """(query heads, KV heads) one device holds: KV heads are replicated when tp > n_kv_heads."""
    return cfg.n_heads / tp, max(1, cfg.n_kv_heads // tp)


def _step(prof: Profile, attention: float, comm: float) -> float:
    """What a ring step adds beyond its attention: the communication that does not hide."""
    return comm - prof.overlap * min(attention, comm)


def prefill_layer(
    cfg: ModelConfig, prof: Profile, *, cp: int, tp: int, new: int, cached: int = 0,
    variant: str = "pass-kv", bytes_per_element: int | None = None, fp8_ffn: bool = False,
    kv_bytes: float | None = None,
) -> PhaseTimes:  # fmt: skip
    """One layer of a prefill of ``new`` tokens over ``cached`` ones, on one of ``cp`` ranks
    of ``tp`` devices each, load-balanced (see the module docstring for each term).

    Args:
        kv_bytes: bytes per element of the K/V pass-KV sends (an FP8 cache's: 1 and its scales;
            default: the model's).
    """
    if cp < 1 or tp < 1 or new < 1 or cached < 0:
        raise ValueError(f"need cp, tp, new >= 1 and cached >= 0, got {cp}, {tp}, {new}, {cached}")
    if variant not in ("pass-kv", "pass-q"):
        raise ValueError(f"unknown variant {variant!r}; choose pass-kv or pass-q")
    e = bytes_per_element or prof.bytes_per_element
    t = new / cp  # this rank's new tokens
    attn_w, ffn_w = layer_weights(cfg)
    gemm_rate = prof.gemm_flops_s_at(cfg.dim, rows=t / tp)
    ffn_rate = gemm_rate * (prof.fp8_speedup if fp8_ffn else 1.0)
    gemm = 2 * t / tp * (attn_w / gemm_rate + ffn_w / ffn_rate)
    # a GEMM of few rows reads its weight faster than it multiplies: the layer's weights are
    # read once per pass whatever its tokens (the roofline; what makes a short prompt's ring
    # no faster than one rank, whose pass reads them too)
    read = (attn_w * e + ffn_w * (1 if fp8_ffn else e)) / tp
    gemm = max(gemm, read / (prof.gemv_bytes_s or prof.hbm_bytes_s))
    # a kernel call's rate by its size: a ring step's pairs, as a causal square of as many
    # (the full prefill's calls are this rank's t queries; a new turn's, fewer over many keys)
    total = attention_flops(cfg, new, cached)
    pairs = total / pair_flops(cfg) / cp**2  # one ring step's (query, key) pairs
    attention = total / (cp * tp) / prof.attention_flops_s_at(cfg.head_dim, math.sqrt(2 * pairs))
    tp_comm = 2 * all_reduce_s(prof, t * cfg.dim * e, tp)
    elementwise = 0.0
    if prof.activation_bytes_s:
        elementwise = t * activation_elements(cfg, tp) * e / prof.activation_bytes_s
    if cp == 1:
        return PhaseTimes(gemm=gemm, attention=attention, tp_comm=tp_comm, elementwise=elementwise)
    q_heads, kv_heads = _heads(cfg, tp)
    fixed = prof.link_latency_s + prof.collective_s
    step_attention = attention / cp
    if variant == "pass-kv":  # K and V of this rank's new tokens and its share of the prefix
        sent = 2 * (t + cached / cp) * cfg.head_dim * (kv_bytes or e) * kv_heads
        return PhaseTimes(
            gemm=gemm, attention=attention, tp_comm=tp_comm, elementwise=elementwise,
            ring_exposed=(cp - 1) * _step(prof, step_attention, sent / prof.link_bytes_s + fixed),
        )  # fmt: skip
    sent = t * cfg.head_dim * e * q_heads  # the query shard
    back = (cp - 1) / cp * t * (cfg.head_dim + 1) * q_heads * e  # outputs and LSE, home
    return PhaseTimes(
        gemm=gemm, attention=attention, tp_comm=tp_comm, elementwise=elementwise,
        ring_exposed=(cp - 1) * _step(prof, step_attention, sent / prof.link_bytes_s + fixed),
        all2all=back / prof.link_bytes_s + prof.all2all_latency_s + prof.collective_s,
    )  # fmt: skip


def faster_variant(
    cfg: ModelConfig, prof: Profile, *, cp: int, tp: int, new: int, cached: int,
    bytes_per_element: int | None = None, kv_bytes: float | None = None,
) -> str:  # fmt: skip
    """The prefill variant whose modelled layer is faster (pass-KV on a tie, and without a
    ring): Alg. 1's comparison, with every term the model has (the exposed steps, the
    collectives' fixed costs, the All2All, the overlap the profile measured)."""
    if cp == 1:
        return "pass-kv"
    times = {
        v: prefill_layer(cfg, prof, cp=cp, tp=tp, new=new, cached=cached, variant=v,
                         bytes_per_element=bytes_per_element, kv_bytes=kv_bytes).total
        for v in ("pass-kv", "pass-q")
    }  # fmt: skip
    return "pass-q" if times["pass-q"] < times["pass-kv"] else "pass-kv"


def weight_bytes(cfg: ModelConfig, *, tp: int, bytes_per_element: int, fp8_ffn: bool) -> float:
    """Bytes of the weights one device reads per decode step: its TP share of every layer and
    of the LM head (of the embedding, one row per token)."""
    attn_w, ffn_w = layer_weights(cfg)
    ffn_bytes = 1 if fp8_ffn else bytes_per_element
    per_layer = attn_w * bytes_per_element + ffn_w * ffn_bytes
    ends = cfg.vocab_size * cfg.dim * bytes_per_element
    return (cfg.n_layers * per_layer + ends) / tp


def decode_s(
    cfg: ModelConfig, prof: Profile, *, cp: int, tp: int, context: int, batch: int = 1,
    bytes_per_element: int | None = None, fp8_ffn: bool = False, kv_bytes: float | None = None,
) -> PhaseTimes:  # fmt: skip
    """One decode step (TTIT) of ``batch`` sequences of ``context`` tokens, all layers: the
    weights (at the one-row GEMMs' rate) and this rank's share of the cache (at decode
    attention's) read once, two all-reduces a layer, under CP (batched pass-Q, or KVP's
    exchange) N-1 SendRecv latencies and an All2All's latency a layer, and the fixed costs of
    a layer and of a step.

    Args:
        kv_bytes: bytes per element of the cache (default: the model's).
    """
    e = bytes_per_element or prof.bytes_per_element
    _, kv_heads = _heads(cfg, tp)
    weights = weight_bytes(cfg, tp=tp, bytes_per_element=e, fp8_ffn=fp8_ffn)
    cache = 2 * cfg.n_layers * context / cp * cfg.head_dim * (kv_bytes or e) * kv_heads * batch
    tp_comm = cfg.n_layers * 2 * all_reduce_s(prof, batch * cfg.dim * e, tp)
    ring = cfg.n_layers * ((cp - 1) * prof.link_latency_s + prof.all2all_latency_s) * (cp > 1)
    layer_s, step_s = prof.decode_layer_s, prof.decode_step_s
    if cp > 1 and prof.decode_cp_layer_s is not None:  # measured with the exchanges in it
        layer_s, step_s, ring = prof.decode_cp_layer_s, prof.decode_cp_step_s or 0.0, 0.0
    memory = weights / (prof.gemv_bytes_s or prof.hbm_bytes_s)
    memory += cache / (prof.decode_kv_bytes_s or prof.hbm_bytes_s)
    fixed = cfg.n_layers * layer_s + step_s
    return PhaseTimes(memory=memory + fixed, tp_comm=tp_comm, ring_exposed=ring)


def spp_ttft_s(
    cfg: ModelConfig, prof: Profile, *, seq_len: int, pp: int, chunk: int, cp: int = 1,
    tp: int = 1, bytes_per_element: int | None = None,
) -> float:  # fmt: skip
    """The TTFT of one prefill of ``seq_len`` tokens cut in chunks of ``chunk`` that stream
    through ``pp`` equal pipeline stages (sequence pipeline parallelism; ``chunk >= seq_len``:
    plain PP, one stage after another).

    A chunk's time on a stage is its layers' (:func:`prefill_layer`, over the cache the chunks
    before it left), a step's fixed cost (the profile's per-step and per-layer costs beyond the
    FLOPs: kernel calls, the engine's bookkeeping) and the hop of its activations to the next
    stage. Every stage takes the same time for a chunk, so the pipeline ends after the sum of
    the chunks' times plus ``pp - 1`` times the longest (filling and draining: a flow shop of
    identical machines).
    """
    if min(seq_len, pp, chunk, cp, tp) < 1:
        raise ValueError(f"need seq_len, pp, chunk, cp, tp >= 1, got {seq_len}, {pp}, {chunk}, "
                         f"{cp}, {tp}")  # fmt: skip
    e = bytes_per_element or prof.bytes_per_element
    layers = cfg.n_layers / pp
    fixed = prof.decode_step_s + layers * prof.decode_layer_s
    times = []
    for start in range(0, seq_len, chunk):
        new = min(chunk, seq_len - start)
        layer = prefill_layer(cfg, prof, cp=cp, tp=tp, new=new, cached=start, bytes_per_element=e)
        hop = (new / cp / tp * cfg.dim * e / prof.intra_bytes_s + prof.intra_latency_s) * (pp > 1)
        times.append(layers * layer.total + fixed + hop)
    return sum(times) + (pp - 1) * max(times)


def best_spp_chunk(
    cfg: ModelConfig, prof: Profile, *, seq_len: int, pp: int, cp: int = 1, tp: int = 1,
    bytes_per_element: int | None = None, min_chunk: int = 32,
) -> int:  # fmt: skip
    """The chunk size whose :func:`spp_ttft_s` is the least, among sizes from ``min_chunk``
    tokens growing by 10% up to the whole prompt (the curve is flat near its minimum: a finer
    search buys nothing the model can promise). The whole prompt at ``pp`` = 1."""
    if pp < 2 or seq_len <= min_chunk:
        return seq_len
    sizes, c = [], float(min_chunk)
    while c < seq_len:
        sizes.append(math.ceil(seq_len / math.ceil(seq_len / c)))  # equal chunks, none short
        c *= 1.1
    sizes.append(seq_len)
    return min(dict.fromkeys(sizes), key=lambda n: spp_ttft_s(
        cfg, prof, seq_len=seq_len, pp=pp, chunk=n, cp=cp, tp=tp,
        bytes_per_element=bytes_per_element))  # fmt: skip
