"""What a layout will do with one prompt (the ``plan`` command), from the hardware model.

The times come from :mod:`cp_infer.hardware` (the mechanisms are explained there): TTFT is the
layers' prefill (pass-KV for a full prefill), TTIT one decode step at the prompt's context. The
memory comes from the planner (:func:`cp_infer.planner.plan_memory`), so a layout that does not
fit its devices says so, and what would fit.

Every record also carries the predicted pass-KV / pass-Q crossover at its context
(:func:`predicted_crossover`): the miss rate below which pass-Q is faster, where the modelled
times of the two variants meet.

Against the paper's published figures (Llama 3 405B on hosts of 8 H100 over RDMA, FP8 FFN
weights; ``tests/test_costmodel.py`` pins each with its bound): TTFT at 128K for CP1..CP16, the
1M point, the TP16 and TP32 baselines, TTIT against CP, and Table 4's crossover at CP4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cp_infer.hardware import Profile, decode_s, prefill_layer
from cp_infer.models.config import ModelConfig
from cp_infer.planner import KV_DTYPES, plan_memory

__all__ = [
    "PUBLISHED", "PlanRecord", "Published", "TierPlan", "plan_prefill", "plan_tiers",
    "predict_benchmark", "predicted_crossover", "ring_min_tokens",
]  # fmt: skip


@dataclass(frozen=True)
class Published:
    """One figure the paper published for Llama 3 405B on its H100 hosts over RDMA, FP8 FFN
    weights, batch 1 (arXiv 2411.01783 v3).

    Attributes:
        what: ``"ttft"`` (s), ``"ttit"`` (s) or ``"crossover"`` (the miss rate below which
            pass-Q was faster, persistent-KV prefill at ``context`` = T+P).
        bound: how close the model must come: a relative error for times, a factor for the
            crossover.
    """

    what: str
    cp: int
    tp: int
    context: int
    value: float
    source: str
    bound: float = 0.15


PUBLISHED = (
    Published("ttft", 1, 8, 131072, 42.010, "Tables 6, 7"),
    Published("ttft", 2, 8, 131072, 21.042, "Tables 6, 7"),
    Published("ttft", 4, 8, 131072, 10.950, "Table 7"),
    Published("ttft", 8, 8, 131072, 5.85, "section 4.2.1"),
    Published("ttft", 16, 8, 131072, 3.8, "section 4.2.3"),
    Published("ttft", 16, 8, 1048576, 77.0, "section 4.2.3, appendix A"),
    Published("ttft", 1, 16, 131072, 29.917, "Table 7 (TP16)"),
    Published("ttft", 1, 32, 131072, 19.841, "Table 7 (TP32)"),
    Published("ttit", 1, 8, 131072, 46.26e-3, "Tables 6, 7"),
    Published("ttit", 2, 8, 131072, 60.23e-3, "Table 7"),
    Published("ttit", 4, 8, 131072, 71.31e-3, "Table 7"),
    Published("ttit", 1, 16, 131072, 39.52e-3, "Table 7 (TP16)"),
    Published("ttit", 1, 32, 131072, 47.3e-3, "Table 7 (TP32)"),
    # Table 4: pass-KV and pass-Q within 0.3% at 5% (6400 new tokens), pass-KV 6% faster at 10%
    Published("crossover", 4, 8, 128000, 0.05, "Table 4, Fig. 9", bound=1.5),
)


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
    crossover_miss_rate: float  # pass-Q is faster below this miss rate, at this context
    ring_min_tokens: int | None  # the shortest prompt the ring prefills faster than one rank
    gemm_s_per_layer: float
    attention_s_per_layer: float
    tp_comm_s_per_layer: float  # the two TP all-reduces
    comm_s_per_layer: float  # ring communication not hidden behind attention
    memory_bytes_per_gpu: float
    fits: bool  # weights, KV cache and activations fit one device
    advice: str  # when it does not fit: what would

    def to_dict(self) -> dict:
        return asdict(self)


def _fp8_ffn(quant: str) -> bool:
    return quant == "fp8"


def _ttft(cfg, prof, *, cp, tp, new, cached, variant, e, fp8_ffn):
    layer = prefill_layer(cfg, prof, cp=cp, tp=tp, new=new, cached=cached, variant=variant,
                          bytes_per_element=e, fp8_ffn=fp8_ffn)  # fmt: skip
    return cfg.n_layers * layer.total, layer


def predicted_crossover(
    cfg: ModelConfig, prof: Profile, *, cp: int, context: int, tp: int | None = None,
    bytes_per_element: int | None = None, quant: str = "none",
) -> float:  # fmt: skip
    """The miss rate T/(T+P) below which pass-Q's modelled prefill of ``context`` = T+P tokens
    is faster than pass-KV's (0.0 at ``cp == 1``: no ring; 1.0 if pass-Q always is)."""
    if cp == 1:
        return 0.0
    tp = tp or prof.devices_per_host

    def q_faster(new: int) -> bool:
        args = dict(cp=cp, tp=tp, new=new, cached=context - new, e=bytes_per_element,
                    fp8_ffn=_fp8_ffn(quant))  # fmt: skip
        return (_ttft(cfg, prof, variant="pass-q", **args)[0]
                < _ttft(cfg, prof, variant="pass-kv", **args)[0])  # fmt: skip

    if not q_faster(1):
        return 0.0
    if q_faster(context):
        return 1.0
    return _first(lambda new: not q_faster(new), 1, context) / context


def _first(holds, lo: int, hi: int) -> int:
    """The least n in (lo, hi] at which ``holds(n)``, by bisection: it fails at ``lo``, holds
    at ``hi``, and changes once between."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


def ring_min_tokens(
    cfg: ModelConfig, prof: Profile, *, cp: int, tp: int | None = None,
    bytes_per_element: int | None = None, quant: str = "none", max_tokens: int = 1 << 24,
) -> int | None:  # fmt: skip
    """The shortest prompt whose modelled prefill on ``cp`` ranks (the ring, pass-KV) takes
    less time than on one of them: below it, the ring's steps cost more than the split work
    saves, and a request is better placed on a single rank of the CP group (``serve
    --ring-min-tokens auto``). None at ``cp == 1``, or when the ring is not faster for any
    prompt of up to ``max_tokens``."""
    if cp < 1 or max_tokens < 1:
        raise ValueError(f"need cp and max_tokens >= 1, got {cp}, {max_tokens}")
    if cp == 1:
        return None
    args = dict(tp=tp or prof.devices_per_host, cached=0, variant="pass-kv",
                e=bytes_per_element or prof.bytes_per_element, fp8_ffn=_fp8_ffn(quant))  # fmt: skip

    def ring_faster(new: int) -> bool:
        return _ttft(cfg, prof, cp=cp, new=new, **args)[0] < _ttft(cfg, prof, cp=1, new=new,
                                                                   **args)[0]  # fmt: skip

    if ring_faster(1):
        return 1
    if not ring_faster(max_tokens):
        return None
    return _first(ring_faster, 1, max_tokens)  # (the ring's gain grows with the prompt)


def plan_prefill(
    cfg: ModelConfig, prof: Profile, *, cp: int, context: int, tp: int | None = None,
    bytes_per_element: int | None = None, quant: str = "none", kv_dtype: str | None = None,
) -> PlanRecord:  # fmt: skip
    """TTFT, TTIT, memory and the per-layer split of one ``context``-token prompt on ``cp``
    ranks of ``tp`` devices.

    Args:
        tp: devices per CP rank (may span hosts: TP16 is two hosts of 8); default: the
            profile's devices per host.
        bytes_per_element: the model's dtype; default: the profile's (2 on GPUs, 4 on a CPU).
        quant: ``"fp8"``: FP8 FFN weights (the paper's 405B runs): half the bytes, twice the
            GEMM rate.
        kv_dtype: the KV cache's dtype (``"fp8_e4m3"``, ``"bfloat16"``, ...); default: the
            model's.
    """
    tp, e = tp or prof.devices_per_host, bytes_per_element or prof.bytes_per_element
    if cp < 1 or tp < 1 or context < 1 or e < 1:
        raise ValueError(f"cp, tp, context and bytes_per_element must be >= 1, got "
                         f"{cp}, {tp}, {context}, {e}")  # fmt: skip
    kv_dtype = kv_dtype or {1: "fp8_e4m3", 2: "bfloat16", 4: "float32"}[e]
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown --kv-dtype {kv_dtype!r}; choose one of {sorted(KV_DTYPES)}")
    fp8 = _fp8_ffn(quant)
    args = dict(tp=tp, new=context, cached=0, variant="pass-kv", e=e, fp8_ffn=fp8)
    ttft, layer = _ttft(cfg, prof, cp=cp, **args)
    ttft1, _ = _ttft(cfg, prof, cp=1, **args)
    kv_bytes = KV_DTYPES[kv_dtype]
    ttit = decode_s(cfg, prof, cp=cp, tp=tp, context=context, bytes_per_element=e,
                    fp8_ffn=fp8, kv_bytes=kv_bytes).total  # fmt: skip
    memory = plan_memory(
        cfg, tp=tp, cp=cp, context=context, dtype_bytes=e, quant=quant,
        fp8_layers=("ffn",), kv_dtype=kv_dtype, device_bytes=int(prof.memory_bytes),
    )  # fmt: skip
    return PlanRecord(
        cp=cp, tp=tp, context=context, ttft_s=ttft, ttit_s=ttit, variant="pass-kv",
        efficiency=ttft1 / (cp * ttft),
        crossover_miss_rate=predicted_crossover(cfg, prof, cp=cp, context=context, tp=tp,
                                                bytes_per_element=e, quant=quant),
        ring_min_tokens=ring_min_tokens(cfg, prof, cp=cp, tp=tp, bytes_per_element=e,
                                        quant=quant),
        gemm_s_per_layer=layer.gemm, attention_s_per_layer=layer.attention,
        tp_comm_s_per_layer=layer.tp_comm, comm_s_per_layer=layer.ring_exposed + layer.all2all,
        memory_bytes_per_gpu=memory.total_bytes, fits=memory.fits,
        advice="" if memory.fits else _advice(cfg, prof, cp=cp, tp=tp, context=context, e=e,
                                              quant=quant, kv_dtype=kv_dtype),
    )  # fmt: skip


def _advice(cfg, prof, *, cp, tp, context, e, quant, kv_dtype) -> str:
    """What would fit one device, tried in order: FP8 FFN weights, FP8 KV, twice the TP, twice
    the CP."""
    tries = []
    if quant != "fp8":
        tries.append(("--quant fp8", dict(quant="fp8")))
    if kv_dtype != "fp8_e4m3":
        tries.append(("--kv-dtype fp8_e4m3", dict(kv_dtype="fp8_e4m3")))
    tries += [(f"--tp {2 * tp}", dict(tp=2 * tp)), (f"--cp {2 * cp}", dict(cp=2 * cp))]
    for flag, change in tries:
        layout = dict(tp=tp, cp=cp, quant=quant, kv_dtype=kv_dtype) | change
        plan = plan_memory(
            cfg, tp=layout["tp"], cp=layout["cp"], context=context, dtype_bytes=e,
            quant=layout["quant"], fp8_layers=("ffn",), kv_dtype=layout["kv_dtype"],
            device_bytes=int(prof.memory_bytes),
        )  # fmt: skip
        if plan.fits:
            return f"does not fit {prof.memory_bytes / 1e9:.0f} GB: {flag} would"
    return f"does not fit {prof.memory_bytes / 1e9:.0f} GB: raise --tp and --cp"


def predict_benchmark(
    cfg: ModelConfig, prof: Profile, *, cp: int, prompt_tokens: int
) -> PlanRecord:
    """The model's forecast of one ``tools/bench_model.py`` row on a calibrated CPU machine:
    every CP rank one single-threaded gloo process (``tp=1``), fp32, a pass-KV prefill of one
    prompt, then decode; the record's ``ttft_s`` and ``ttit_s`` are its TTFT and TTIT."""
    return plan_prefill(cfg, prof, cp=cp, tp=1, context=prompt_tokens, bytes_per_element=4)


@dataclass(frozen=True)
class TierPlan:
    """How many hosts a disaggregated deployment needs for a workload (``plan --tiers``).

    The prefill tier is ``prefill_replicas`` groups of ``prefill_cp`` hosts, each prefilling one
    prompt at a time (CP across its hosts); a prompt waits for a free group (an M/D/1 queue
    per group at the arrival rate's share) and its KV then moves to the decode tier. The
    decode tier is ``decode_replicas`` groups of ``decode_hosts_per_replica`` hosts (TP across
    their devices), each decoding ``batch`` requests at once; by Little's law the tier holds
    ``rate x output x TTIT`` requests.
    """

    prompt: int
    output: int
    rate: float
    prefill_cp: int
    prefill_replicas: int
    prefill_s: float  # one prefill on a group
    queue_s: float  # mean wait for a free group
    handoff_s: float  # the KV's move to the decode tier (after the prefill: not overlapped)
    ttft_s: float  # prefill + queue + hand-off
    prefill_utilization: float
    decode_hosts_per_replica: int
    decode_replicas: int
    batch: int  # requests a decode group holds at once
    ttit_s: float  # at that batch
    concurrency: float  # requests decoding at once over the tier
    ttft_ok: bool
    tbt_ok: bool
    note: str

    @property
    def prefill_hosts(self) -> int:
        return self.prefill_cp * self.prefill_replicas

    @property
    def decode_hosts(self) -> int:
        return self.decode_hosts_per_replica * self.decode_replicas

    def to_dict(self) -> dict:
        return asdict(self) | {"prefill_hosts": self.prefill_hosts,
                               "decode_hosts": self.decode_hosts}  # fmt: skip


def plan_tiers(
    cfg: ModelConfig, prof: Profile, *, prompt: int, output: int, rate: float,
    ttft_slo_s: float, tbt_slo_s: float, quant: str = "none", kv_dtype: str | None = None,
    bytes_per_element: int | None = None, max_hosts: int = 64,
) -> TierPlan:  # fmt: skip
    """The fewest hosts of each tier that serve ``rate`` requests/s of ``prompt`` + ``output``
    tokens within ``ttft_slo_s`` (the time to first token, queueing and the hand-off included)
    and ``tbt_slo_s`` (the time between tokens), on ``prof``'s hosts of ``devices_per_host``.

    Raises:
        ValueError: a non-positive size, rate or target.
    """
    if min(prompt, output, max_hosts) < 1 or not (rate > 0 and ttft_slo_s > 0 and tbt_slo_s > 0):
        raise ValueError(f"prompt, output, max hosts >= 1 and rate, targets > 0, got {prompt}, "
                         f"{output}, {max_hosts}, {rate}, {ttft_slo_s}, {tbt_slo_s}")  # fmt: skip
    e = bytes_per_element or prof.bytes_per_element
    kv_dtype = kv_dtype or {1: "fp8_e4m3", 2: "bfloat16", 4: "float32"}[e]
    host = prof.devices_per_host
    kv_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * KV_DTYPES[kv_dtype]
    # the decode tier receives a prompt's KV over its group's links (one NIC per device)
    handoff = prompt * kv_token / (host * prof.link_bytes_s)

    # prefill: the fewest hosts, over CP sizes that fit and replicas that keep up
    best = None
    cp = 1
    while cp <= max_hosts:
        rec = plan_prefill(cfg, prof, cp=cp, tp=host, context=prompt, bytes_per_element=e,
                           quant=quant, kv_dtype=kv_dtype)  # fmt: skip
        if rec.fits:
            s = rec.ttft_s
            replicas = max(1, math.floor(rate * s) + 1)  # utilization below 1
            while cp * replicas <= max_hosts:
                rho = rate * s / replicas
                wait = rho * s / (2 * (1 - rho))
                ttft = s + wait + handoff
                if ttft <= ttft_slo_s:
                    break
                replicas += 1
            option = (cp * replicas, ttft, cp, replicas, s, wait, rho)
            if cp * replicas <= max_hosts and (best is None or option[:2] < best[:2]):
                best = option
        cp *= 2
    notes = []
    if best is None:  # nothing meets the target within max_hosts: the fastest group, alone
        cp = max_hosts
        s = plan_prefill(cfg, prof, cp=cp, tp=host, context=prompt, bytes_per_element=e,
                         quant=quant, kv_dtype=kv_dtype).ttft_s  # fmt: skip
        best = (cp, s + handoff, cp, 1, s, 0.0, min(rate * s, 1.0))
        notes.append(f"no layout within {max_hosts} hosts meets the TTFT target")
    _, ttft, pcp, preps, s, wait, rho = best

    # decode: the smallest group that holds the weights and one request's KV (it runs no
    # prefill: a prompt's activations are the prefill tier's), then the batch that meets the
    # TBT target and fits
    fp8 = _fp8_ffn(quant)

    def fits(batch: int, tp: int) -> bool:
        m = plan_memory(cfg, tp=tp, context=prompt + output, batch=batch, dtype_bytes=e,
                        quant=quant, fp8_layers=("ffn",), kv_dtype=kv_dtype,
                        device_bytes=int(prof.memory_bytes))  # fmt: skip
        return m.weight_bytes + m.kv_cache_bytes <= prof.memory_bytes

    hosts = 1
    while hosts < max_hosts and not fits(1, host * hosts):
        hosts *= 2
    tp = host * hosts

    def ttit(batch: int) -> float:
        return decode_s(
            cfg,
            prof,
            cp=1,
            tp=tp,
            context=prompt + output // 2,
            batch=batch,
            bytes_per_element=e,
            fp8_ffn=fp8,
            kv_bytes=KV_DTYPES[kv_dtype],
        ).total

    batch = 1
    while batch < 4096 and ttit(2 * batch) <= tbt_slo_s and fits(2 * batch, tp):
        batch *= 2
    lo, hi = batch, 2 * batch  # the largest batch that still meets both, between them
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ttit(mid) <= tbt_slo_s and fits(mid, tp) else (lo, mid)
    batch, step = lo, ttit(lo)
    tbt_ok = step <= tbt_slo_s
    if not tbt_ok:
        notes.append("one request alone misses the TBT target")
    concurrency = rate * output * step
    replicas = max(1, math.ceil(concurrency / batch))
    return TierPlan(
        prompt=prompt, output=output, rate=rate, prefill_cp=pcp, prefill_replicas=preps,
        prefill_s=s, queue_s=wait, handoff_s=handoff, ttft_s=ttft, prefill_utilization=rho,
        decode_hosts_per_replica=hosts, decode_replicas=replicas, batch=batch, ttit_s=step,
        concurrency=concurrency, ttft_ok=ttft <= ttft_slo_s, tbt_ok=tbt_ok,
        note="; ".join(notes),
    )  # fmt: skip
