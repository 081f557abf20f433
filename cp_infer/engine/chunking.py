"""Adaptive prefill chunks under a time-between-tokens target (Mnemosyne's mixed batching).

Every iteration of the server runs the decode step of its running requests and then one prefill
chunk of the waiting ones. A running request's time between tokens (TBT) is therefore the
iteration: its decode step plus the chunk. With a target ``--tbt-slo-ms``, the chunk is the
largest that keeps the predicted iteration under it:

    decode_s + overhead_s + scale * prefill_s(chunk, cached) <= slo

- ``prefill_s`` comes from the calibrated profile (``python -m cp_infer calibrate``): the GEMMs
  of a new token, ``2 * weights / (cp * tp)`` FLOPs at the profile's GEMM FLOP/s, and attention
  over what is cached and the chunk itself, ``4 * H * D * (cached + chunk / 2)`` FLOPs per new
  token and layer at its attention FLOP/s (:class:`StepCosts`).
- ``decode_s`` (the running decodes' step, a moving average) and ``overhead_s`` + ``scale`` (a
  least-squares line from predicted to measured prefill steps, for what FLOPs do not count: a
  step's fixed cost, norms, RoPE, the ring, Python) are what rank 0 measures
  (:class:`Estimates`). They reach every rank with the iteration's orders, so every rank picks
  the same chunk from the same numbers (:func:`choose_chunk`).
- Until the line is known over a range, a chunk is at most twice the largest one measured
  (a slow start from :data:`MIN_CHUNK`): a first guess from FLOPs alone can be far off.

Without running decodes there is no TBT to keep: the waiting prompts prefill whole.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from cp_infer.hardware import Profile, gemm_flops, pair_flops, profile
from cp_infer.models.config import ModelConfig

__all__ = ["ChunkTimer", "Estimates", "StepCosts", "choose_chunk"]

logger = logging.getLogger(__name__)

MIN_CHUNK = 16  # tokens: a prefill always progresses, even when the target cannot be met


@dataclass(frozen=True)
class StepCosts:
    """Predicted seconds of a forward pass from its FLOPs (every stage, one after another).

    Attributes:
        per_token_s: the GEMMs of one new token.
        per_pair_s: attention of one (query, key) pair, over all layers.
    """

    per_token_s: float
    per_pair_s: float

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, *, cp: int, tp: int, gemm_flops_s: float, attention_flops_s: float
    ) -> StepCosts:
        """The costs of ``cfg`` sharded ``cp`` x ``tp`` ways, at one rank's FLOP/s (the counts
        are the hardware model's: :func:`~cp_infer.hardware.gemm_flops`,
        :func:`~cp_infer.hardware.pair_flops`)."""
        per_token = cfg.n_layers * gemm_flops(cfg, 1) / (cp * tp) / gemm_flops_s
        per_pair = cfg.n_layers * pair_flops(cfg) / (cp * tp) / attention_flops_s
        return cls(per_token_s=per_token, per_pair_s=per_pair)

    @classmethod
    def from_hardware(
        cls, cfg: ModelConfig, spec: str | Path | Profile | None, *, cp: int, tp: int
    ) -> StepCosts:
        """From ``--hardware``: a :class:`~cp_infer.hardware.Profile`, a built-in profile's
        name or a calibrated JSON file (its achieved GEMM and attention FLOP/s); None: this
        CPU's built-in profile. An unknown name is an error."""
        prof = spec if isinstance(spec, Profile) else profile(spec or "cpu-gloo")
        return cls.for_model(cfg, cp=cp, tp=tp, gemm_flops_s=prof.gemm_flops_s_at(cfg.dim),
                             attention_flops_s=prof.attention_flops_s_at(cfg.head_dim))  # fmt: skip

    def prefill_s(self, new: int, cached: int) -> float:
        """A prefill of ``new`` tokens over ``cached`` (causal within the new ones)."""
        return self.per_token_s * new + self.per_pair_s * new * (cached + new / 2)

    def decode_s(self, batch: int, context: int) -> float:
        """A decode step of ``batch`` sequences holding ``context`` tokens in all."""
        return self.per_token_s * batch + self.per_pair_s * context


@dataclass(frozen=True)
class Estimates:
    """What rank 0 has measured so far (sent to every rank with each iteration's orders).

    Attributes:
        decode_s: moving average of the decode step (None before the first one).
        overhead_s, scale: measured prefill step ~= ``overhead_s + scale * predicted`` (None:
            not yet measured, the prediction is taken as it is).
        largest: the largest prefill step measured (tokens); chunks grow to twice it at most.
        margin_s: how much mixed iterations overran their prediction, at the 95th
            percentile of the recent ones (the jitter the target keeps clear of).
        mixed_overhead_s, mixed_scale: a fused iteration (the decodes and a chunk in one pass)
            ~= ``mixed_overhead_s + mixed_scale * predicted chunk`` (None: none measured yet;
            the decode step and the chunk are then added up).
    """

    decode_s: float | None = None
    overhead_s: float = 0.0
    scale: float | None = None
    largest: int = 0
    margin_s: float = 0.0
    mixed_overhead_s: float = 0.0
    mixed_scale: float | None = None

    def iteration_s(
        self, costs: StepCosts, *, new: int, cached: int, decode_batch: int, decode_context: int
    ) -> float:
        """Predicted mixed iteration: the decode step and a prefill of ``new`` tokens."""
        if self.mixed_scale is not None:
            return self.mixed_overhead_s + self.mixed_scale * costs.prefill_s(new, cached)
        decode = self.decode_s
        if decode is None:
            decode = costs.decode_s(decode_batch, decode_context)
        return decode + self.overhead_s + (self.scale or 1.0) * costs.prefill_s(new, cached)


def choose_chunk(
    slo_s: float, costs: StepCosts, est: Estimates, *, cached: int, left: int,
    decode_batch: int, decode_context: int, min_chunk: int = MIN_CHUNK,
) -> int:  # fmt: skip
    """The largest prefill chunk (tokens, at most ``left``) that keeps an iteration under
    ``slo_s``; at least ``min_chunk`` so that the prefill progresses.

    Args:
        cached: tokens the chunk attends to before its own (the prompt's cached prefix and
            its earlier chunks).
        left: tokens the waiting prompts still have to prefill.
        decode_batch, decode_context: the running decodes (their predicted step, until one
            was measured).
    """

    def fits(c: int) -> bool:
        predicted = est.iteration_s(costs, new=c, cached=cached, decode_batch=decode_batch,
                                    decode_context=decode_context)  # fmt: skip
        return predicted + est.margin_s <= slo_s

    lo = min(min_chunk, left)
    if not fits(lo):
        return lo
    hi = min(left, max(2 * est.largest, min_chunk))
    while lo < hi:  # the largest c with fits(c): prefill_s grows with c
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


class ChunkTimer:
    """Rank 0's estimates (:class:`Estimates`), from the step times it measures.

    Args:
        costs: the predicted costs that measured prefill times are fitted to.
        alpha: weight of the newest decode step in its moving average.
        window: prefill steps the line is fitted over.
    """

    def __init__(self, costs: StepCosts, alpha: float = 0.3, window: int = 32) -> None:
        self.costs, self.alpha = costs, alpha
        self.estimates = Estimates()
        self._points: deque[tuple[float, float]] = deque(maxlen=window)
        self._mixed: deque[tuple[float, float]] = deque(maxlen=window)
        self._overruns: deque[float] = deque(maxlen=2 * window)

    def iteration(self, seconds: float, predicted: float) -> None:
        """A mixed iteration took ``seconds`` against ``predicted`` (what its chunk was sized
        from): the margin is the 95th percentile of the recent overruns, at least 0."""
        self._overruns.append(seconds - predicted)
        ranked = sorted(self._overruns)
        tail = ranked[min(len(ranked) - 1, int(0.95 * len(ranked)))]
        self.estimates = replace(self.estimates, margin_s=max(tail, 0.0))

    def decode(self, seconds: float) -> None:
        old = self.estimates.decode_s
        mixed = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        self.estimates = replace(self.estimates, decode_s=mixed)

    def prefill(self, seconds: float, new: int, cached: int) -> None:
        predicted = self.costs.prefill_s(new, cached)
        if predicted <= 0:
            return
        self._points.append((predicted, seconds))
        overhead, scale = _fit(self._points)
        largest = max(self.estimates.largest, new)
        self.estimates = replace(self.estimates, overhead_s=overhead, scale=scale, largest=largest)

    def mixed(self, seconds: float, new: int, cached: int) -> None:
        """A fused iteration (decodes and a chunk of ``new`` tokens in one pass) took
        ``seconds``."""
        predicted = self.costs.prefill_s(new, cached)
        if predicted <= 0:
            return
        self._mixed.append((predicted, seconds))
        overhead, scale = _fit(self._mixed)
        self.estimates = replace(
            self.estimates, mixed_overhead_s=overhead, mixed_scale=scale,
            largest=max(self.estimates.largest, new),
        )  # fmt: skip


def _fit(points) -> tuple[float, float]:
    """measured ~= a + b * predicted by least squares, with a >= 0 and b > 0."""
    n = len(points)
    mp = sum(p for p, _ in points) / n
    mm = sum(m for _, m in points) / n
    var = sum((p - mp) ** 2 for p, _ in points)
    if n >= 3 and var > 0:
        b = sum((p - mp) * (m - mm) for p, m in points) / var
        a = mm - b * mp
        if b > 0 and a >= 0:
            return a, b
    # too few or too alike points, or a line through negative values: through the origin
    return 0.0, sum(p * m for p, m in points) / sum(p * p for p, _ in points)
