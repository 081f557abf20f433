"""Choosing pass-KV or pass-Q for a prefill (paper §3.3.3, Alg. 1, Eq. 1-3, appendix C).

With T new tokens over P cached ones on N CP ranks (NH query heads, NKV KV heads, e bytes per
element, C FLOP/s and BW bytes/s per rank):

- Eq. 1: pass-Q moves fewer bytes than pass-KV when the miss rate T/(T+P) <= 2*NKV/NH.
- Eq. 2: pass-KV's SendRecv hides under attention when T >= N*C*NKV*e / (2*NH*BW).
- Eq. 3: pass-Q's SendRecv hides when T+P >= N*e*C / (4*BW).
- Alg. 1: pass-KV if Eq. 2 holds or the miss rate is above the Eq. 1 threshold, else pass-Q.
  Appendix C charges pass-Q's All2All too, lowering the threshold by 4*T*BW / (N*C*e).
- :func:`crossover_miss_rate` solves Alg. 1 for the miss rate at a given T+P: the predicted
  pass-KV / pass-Q crossover (``python -m cp_infer plan`` prints it).

Under TP every rank holds NH/tp query heads and max(1, NKV/tp) KV heads: when tp > NKV the KV
heads are replicated, and the KV a rank sends is that of max(NKV, tp)/tp heads. The formulas
then see NKV as max(NKV, tp) (Eq. 1 for Llama 3 405B at tp=16: 25%, not 12.5%).

C and BW are a profile's achieved attention FLOP/s and link bandwidth
(:meth:`cp_infer.hardware.Profile.selector`): the one hardware model the planner and the
server's chunk sizing use too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Hardware",
    "all2all_correction_per_token",
    "choose_variant",
    "crossover_miss_rate",
    "miss_rate_threshold",
    "pass_kv_hidden_min_tokens",
    "pass_q_hidden_min_context",
]


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """Per-rank compute and link speed used by the selector.

    Args:
        flops: attention FLOP/s of one rank (C).
        bandwidth: bytes/s one rank sends over the CP ring (BW).
    """

    flops: float
    bandwidth: float

    def __post_init__(self) -> None:
        if self.flops <= 0 or self.bandwidth <= 0:
            raise ValueError(f"flops and bandwidth must be > 0, got {self.flops}, {self.bandwidth}")


def miss_rate_threshold(n_heads: int, n_kv_heads: int) -> float:
    """Eq. 1: below this miss rate T/(T+P), pass-Q moves fewer bytes (12.5% for Llama 3 405B)."""
    return 2 * n_kv_heads / n_heads


def pass_kv_hidden_min_tokens(
    cp: int, n_heads: int, n_kv_heads: int, e: int, hw: Hardware
) -> float:
    """Eq. 2: new tokens from which pass-KV's communication hides under its attention."""
    return cp * hw.flops * n_kv_heads * e / (2 * n_heads * hw.bandwidth)


def pass_q_hidden_min_context(cp: int, e: int, hw: Hardware) -> float:
    """Eq. 3: context length T+P from which pass-Q's SendRecv hides under its attention."""
    return cp * e * hw.flops / (4 * hw.bandwidth)


def all2all_correction_per_token(cp: int, e: int, hw: Hardware) -> float:
    """Appendix C: pass-Q's All2All lowers the Eq. 1 threshold by this much per new token."""
    return 4 * hw.bandwidth / (cp * hw.flops * e)


def _sent_kv_heads(n_kv_heads: int, tp: int) -> int:
    # as sent: with tp > n_kv_heads the replicated KV heads travel with every rank
    return max(n_kv_heads, tp)


def crossover_miss_rate(
    context: int,
    *,
    cp: int,
    n_heads: int,
    n_kv_heads: int,
    bytes_per_element: int,
    hardware: Hardware,
    tp: int = 1,
    all2all_correction: bool = True,
) -> float:
    """Alg. 1 solved for the miss rate: below it, a prefill of ``context`` = T+P tokens goes
    pass-Q; at or above it, pass-KV (:func:`choose_variant` agrees on both sides).

    With X = T+P and miss rate m = T/X, Alg. 1 keeps pass-Q while both m*X < Eq. 2's token
    count and m < Eq. 1's threshold less appendix C's m*X*k (k from
    :func:`all2all_correction_per_token`), i.e. m < threshold / (1 + X*k). The crossover is the
    smaller of the two bounds, capped at 1.0 (pass-Q at every miss rate); it never grows with
    the context. 0.0 at ``cp == 1``: without a ring Alg. 1 always answers pass-KV.

    Args: as :func:`choose_variant`, with ``context`` for T+P.
    """
    if context < 1:
        raise ValueError(f"need context >= 1, got {context}")
    if cp == 1:
        return 0.0
    e, n_kv_heads = bytes_per_element, _sent_kv_heads(n_kv_heads, tp)
    hidden = pass_kv_hidden_min_tokens(cp, n_heads, n_kv_heads, e, hardware) / context
    fewer_bytes = miss_rate_threshold(n_heads, n_kv_heads)
    if all2all_correction:
        fewer_bytes /= 1 + context * all2all_correction_per_token(cp, e, hardware)
    return min(1.0, hidden, fewer_bytes)


def choose_variant(
    new_tokens: int,
    cached_tokens: int,
    *,
    cp: int,
    n_heads: int,
    n_kv_heads: int,
    bytes_per_element: int,
    hardware: Hardware,
    tp: int = 1,
    all2all_correction: bool = True,
) -> str:
    """Alg. 1: ``"pass-kv"`` or ``"pass-q"`` for a prefill of ``new_tokens`` over ``cached_tokens``.

    Args:
        new_tokens: T, tokens to prefill (summed over the batch).
        cached_tokens: P, tokens already in the KV cache (summed over the batch).
        cp: N, context-parallel size.
        n_heads, n_kv_heads: query and KV heads (the model's, before TP).
        bytes_per_element: e of the K/V/Q messages.
        hardware: C and BW.
        tp: tensor-parallel size (KV heads replicated when ``tp > n_kv_heads`` are sent too).
        all2all_correction: apply appendix C's All2All term to the miss-rate threshold.
    """
    if new_tokens < 1 or cached_tokens < 0:
        raise ValueError(
            f"need new_tokens >= 1 and cached_tokens >= 0, got {new_tokens}, {cached_tokens}"
        )
    if cp == 1:
        return "pass-kv"  # no ring: both are local attention
    t, p, e = new_tokens, cached_tokens, bytes_per_element
    n_kv_heads = _sent_kv_heads(n_kv_heads, tp)
    if t >= pass_kv_hidden_min_tokens(cp, n_heads, n_kv_heads, e, hardware):
        return "pass-kv"
    threshold = miss_rate_threshold(n_heads, n_kv_heads)
    if all2all_correction:
        threshold -= t * all2all_correction_per_token(cp, e, hardware)
    return "pass-kv" if t / (t + p) >= threshold else "pass-q"
