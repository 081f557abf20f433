"""The pass-KV / pass-Q selector (paper Alg. 1, Eq. 1-3): pure arithmetic."""

import pytest

from cp_infer.attention.selector import (
    Hardware,
    choose_variant,
    miss_rate_threshold,
    pass_kv_hidden_min_tokens,
    pass_q_hidden_min_context,
)
from cp_infer.hardware import PROFILES

LLAMA_405B = dict(n_heads=128, n_kv_heads=8)


def test_eq1_threshold_is_12_5_percent_for_405b():
    assert miss_rate_threshold(**LLAMA_405B) == pytest.approx(0.125)


def test_eq2_eq3_scale_as_the_formulas_say():
    hw = Hardware(flops=800e12, bandwidth=50e9)
    t2 = pass_kv_hidden_min_tokens(16, 128, 8, 2, hw)
    assert t2 == pytest.approx(16 * 800e12 * 8 * 2 / (2 * 128 * 50e9))
    assert pass_kv_hidden_min_tokens(32, 128, 8, 2, hw) == pytest.approx(2 * t2)  # linear in N
    assert pass_q_hidden_min_context(16, 2, hw) == pytest.approx(16 * 2 * 800e12 / (4 * 50e9))


def _choose(t, p, cp=4, hw="h100-rdma", **kw):
    return choose_variant(
        t, p, cp=cp, bytes_per_element=2, hardware=PROFILES[hw].selector(), **LLAMA_405B, **kw
    )


def test_alg1_decisions():
    # full prefill: miss rate 1 -> pass-KV
    assert _choose(4096, 0) == "pass-kv"
    # a short turn over a long cached context (miss rate 1%) -> pass-Q
    assert _choose(1000, 99_000) == "pass-q"
    # miss rate 20% > 12.5% -> pass-KV
    assert _choose(1000, 4000, all2all_correction=False) == "pass-kv"
    # enough new tokens to hide pass-KV's SendRecv (Eq. 2) -> pass-KV at any miss rate
    t2 = pass_kv_hidden_min_tokens(4, 128, 8, 2, PROFILES["h100-rdma"].selector())
    assert _choose(int(t2) + 1, 10_000_000, all2all_correction=False) == "pass-kv"
    assert _choose(int(t2) - 1, 10_000_000, all2all_correction=False) == "pass-q"
    # no ring, no choice
    assert _choose(10, 10_000, cp=1) == "pass-kv"


def test_appendix_c_lowers_the_threshold():
    # miss rate just under 12.5%: pass-Q by Eq. 1 alone, pass-KV once pass-Q pays its All2All
    t, p = 1000, 7100  # miss rate 0.1235
    hw = Hardware(flops=1e15, bandwidth=1e10)  # Eq. 2 needs 12500 tokens: not met by 1000
    args = dict(cp=2, bytes_per_element=2, hardware=hw, **LLAMA_405B)
    assert choose_variant(t, p, all2all_correction=False, **args) == "pass-q"
    assert choose_variant(t, p, all2all_correction=True, **args) == "pass-kv"


def test_bad_arguments():
    with pytest.raises(ValueError, match="new_tokens >= 1"):
        _choose(0, 10)
    with pytest.raises(ValueError, match="must be > 0"):
        Hardware(flops=0, bandwidth=1)


def test_replicated_kv_heads_count_as_sent():
    """405B at tp=16: every rank sends one KV head for 8 query heads, so Eq. 1's threshold is
    2*16/128 = 25%, not 12.5%; a 20% miss rate then goes pass-Q."""
    args = dict(cp=2, bytes_per_element=2, hardware=Hardware(flops=1e15, bandwidth=1e10),
                all2all_correction=False, **LLAMA_405B)  # fmt: skip
    t, p = 1000, 4000  # miss rate 0.2, and Eq. 2 needs more tokens than 1000 at either tp
    assert choose_variant(t, p, tp=8, **args) == "pass-kv"  # tp <= n_kv: 12.5%
    assert choose_variant(t, p, tp=16, **args) == "pass-q"  # replicated: 25%


def test_hardware_follows_the_device_not_the_machine():
    from cp_infer.hardware import hardware_for

    assert hardware_for("cpu") is PROFILES["cpu-gloo"]
    assert hardware_for("cuda:0") is PROFILES["h100-rdma"]
