"""The cost model reproduces the paper's published prefill times (within 5%), maps a
calibrated CPU profile, predicts Alg. 1's crossover, and plots."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from cp_infer.attention.selector import Hardware, choose_variant, crossover_miss_rate
from cp_infer.costmodel import (
    PROFILES,
    ClusterProfile,
    cluster_profile,
    plan_prefill,
    predict_benchmark,
    predicted_crossover,
)
from cp_infer.models import get_preset


@pytest.mark.parametrize(
    ("context", "paper_s"),
    [(131072, 3.8), (1_000_000, 77.0)],  # Llama 3 405B on 16 hosts of 8 H100 (RDMA)
)
def test_the_papers_prefill_times(context, paper_s):
    r = plan_prefill(get_preset("llama3-405b"), PROFILES["h100-rdma"], cp=16, tp=8, context=context)
    assert abs(r.ttft_s / paper_s - 1) <= 0.05, r.ttft_s  # 128K is the fit, 1M a prediction


def test_more_hosts_cut_ttft_and_the_ring_hides_at_these_sizes():
    cfg, prof = get_preset("llama3-405b"), PROFILES["h100-tcp"]
    times = [plan_prefill(cfg, prof, cp=n, tp=8, context=131072) for n in (1, 2, 4, 8, 16)]
    assert all(a.ttft_s > b.ttft_s for a, b in itertools.pairwise(times))
    assert all(t.comm_s_per_layer == 0 for t in times)  # even TCP hides pass-KV here (§4.2)
    # a tiny context on many hosts cannot hide its ring: the model says so
    short = plan_prefill(cfg, prof, cp=16, tp=8, context=2048)
    assert short.comm_s_per_layer > 0 and short.efficiency < 1


def test_plan_command_writes_its_records(tmp_path, capsys):
    from cp_infer.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--preset", "llama3-405b", "--context", "131072", "--cp", "1,16",
                 "--json", str(out)]) == 0  # fmt: skip
    records = json.loads(out.read_text())
    assert [r["cp"] for r in records] == [1, 16]
    assert set(records[0]) >= {"cp", "tp", "context", "ttft_s", "ttit_s", "variant",
                               "efficiency", "memory_bytes_per_gpu"}  # fmt: skip
    assert "llama3-405b" in capsys.readouterr().out


# -- a calibrated CPU profile (python -m cp_infer calibrate) ------------------------------------

# figures of the order calibrate measures on this project's CPU machine (docs/performance.md)
CPU_PROFILE = {
    "attention_flops": 7.9e10, "gemm_flops": 8.5e10, "ring_bandwidth": 1.8e9,
    "ring_latency_s": 3.3e-4, "all2all_s": 5e-3, "all2all_bytes": 16 * 2**20,
    "memory_bandwidth": 1.2e10, "host_memory_bytes": 64 * 2**30, "world": 2,
    "threads_per_rank": 1, "tokens": 4096,
}  # fmt: skip


def _write(tmp_path, profile, name="profile.json"):
    path = tmp_path / name
    path.write_text(profile if isinstance(profile, str) else json.dumps(profile))
    return path


def test_a_calibrated_profile_maps_onto_the_model(tmp_path):
    from cp_infer.attention.selector import Hardware

    path = _write(tmp_path, CPU_PROFILE)
    prof = ClusterProfile.from_calibration(path)
    assert prof.peak_flops == CPU_PROFILE["gemm_flops"] and prof.gemm_utilization == 1.0
    assert prof.peak_flops * prof.attention_utilization == pytest.approx(7.9e10)
    assert (prof.link_bytes_s, prof.link_latency_s) == (1.8e9, 3.3e-4)
    assert (prof.hbm_bytes_s, prof.memory_bytes) == (1.2e10, 64 * 2**30)
    assert (prof.tp, prof.bytes_per_element) == (1, 4)
    # Alg. 1 sees what generate --hardware PATH sees
    hw, ref = prof.selector_hardware(), Hardware.from_profile(path)
    assert hw.flops == pytest.approx(ref.flops) and hw.bandwidth == ref.bandwidth
    assert cluster_profile(path) == prof and cluster_profile("h100-tcp") is PROFILES["h100-tcp"]


def test_an_old_profile_without_memory_bandwidth_loads_with_a_warning(tmp_path, caplog):
    old = {k: v for k, v in CPU_PROFILE.items() if k not in ("memory_bandwidth",
                                                             "host_memory_bytes")}  # fmt: skip
    with caplog.at_level("WARNING", logger="cp_infer.costmodel"):
        prof = ClusterProfile.from_calibration(_write(tmp_path, old))
    assert prof.hbm_bytes_s == 10e9 and prof.memory_bytes > 0
    assert "no memory_bandwidth" in caplog.text and "python -m cp_infer calibrate" in caplog.text


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{", "not JSON"),
        ("[1, 2]", "not an object"),
        (json.dumps({"attention_flops": 1e10}), "it lacks gemm_flops"),
        (json.dumps({**CPU_PROFILE, "ring_bandwidth": -1}), "ring_bandwidth must be a number > 0"),
        (json.dumps({**CPU_PROFILE, "gemm_flops": "fast"}), "gemm_flops must be a number > 0"),
    ],
)
def test_a_corrupt_profile_is_refused_with_the_fix(tmp_path, content, why):
    with pytest.raises(ValueError, match="not a profile from `python -m cp_infer calibrate`") as e:
        ClusterProfile.from_calibration(_write(tmp_path, content))
    assert why in str(e.value) and "python -m cp_infer calibrate --output" in str(e.value)
    with pytest.raises(ValueError, match="neither a built-in profile"):
        cluster_profile(tmp_path / "missing.json")


def test_plan_on_a_calibrated_profile_defaults_to_tp1_fp32(tmp_path):
    from cp_infer.cli import main

    path, out = _write(tmp_path, CPU_PROFILE), tmp_path / "plan.json"
    argv = ["plan", "--preset", "small-llama", "--hardware", str(path), "--context", "16384",
            "--cp", "1,2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    records = json.loads(out.read_text())
    cfg, prof = get_preset("small-llama"), ClusterProfile.from_calibration(path)
    want = plan_prefill(cfg, prof, cp=2, tp=1, context=16384, bytes_per_element=4)
    assert records[1] == want.to_dict() and want == predict_benchmark(
        cfg, prof, cp=2, prompt_tokens=16384
    )  # fmt: skip
    # explicit --tp and --dtype-bytes win over the profile's defaults
    assert main([*argv, "--tp", "2", "--dtype-bytes", "2"]) == 0
    r = json.loads(out.read_text())[1]
    assert r == plan_prefill(cfg, prof, cp=2, tp=2, context=16384, bytes_per_element=2).to_dict()
    # and a corrupt profile stops the command (exit 1) before anything is written
    out.unlink()
    assert main([*argv[:4], str(_write(tmp_path, "{", "bad.json")), *argv[5:]]) == 1
    assert not out.exists()


def test_the_cpu_forecast_halves_prefill_and_not_decode(tmp_path):
    prof = ClusterProfile.from_calibration(_write(tmp_path, CPU_PROFILE))
    cfg = get_preset("small-llama")
    one, two = (predict_benchmark(cfg, prof, cp=n, prompt_tokens=16384) for n in (1, 2))
    assert two.ttft_s == pytest.approx(one.ttft_s / 2, rel=0.05)  # the ring hides at 16K
    assert two.ttit_s > 0.5 * one.ttit_s  # every rank still reads all the weights


def test_plot_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from cp_infer.cli import main

    for name in ("plan.png", "plan.svg"):
        out = tmp_path / "figs" / name
        assert main(["plan", "--preset", "llama3-405b", "--hardware", "h100-tcp", "--context",
                     "2048", "--cp", "1,2,4", "--plot", str(out)]) == 0  # fmt: skip
        assert out.stat().st_size > 1000
    assert main(["plan", "--preset", "llama3-405b", "--context", "2048",
                 "--plot", str(tmp_path / "plan.gif")]) == 1  # fmt: skip
    assert not (tmp_path / "plan.gif").exists()


# -- Alg. 1's predicted pass-KV / pass-Q crossover ----------------------------------------------

LLAMA_405B_HEADS = dict(n_heads=128, n_kv_heads=8)


@pytest.mark.parametrize(
    "hw",
    [
        Hardware(flops=540e12, bandwidth=50e9),  # the H100s: appendix C's bound binds
        Hardware(flops=7.9e10, bandwidth=1.8e9),  # this CPU: Eq. 2 binds
        Hardware(flops=1e15, bandwidth=1e9),  # slow link: Eq. 1's 12.5% less appendix C
    ],
)
@pytest.mark.parametrize("cp", [2, 4, 16])
def test_the_crossover_matches_alg1_on_both_sides(hw, cp):
    args = dict(cp=cp, bytes_per_element=2, hardware=hw, **LLAMA_405B_HEADS)
    last, checked = 1.0, 0
    for context in (4096, 32768, 131072, 1_048_576):
        m = crossover_miss_rate(context, **args)
        assert 0 < m <= last  # never grows with the context
        last = m
        below, above = math.floor(0.98 * m * context), math.ceil(1.02 * m * context)
        for t, want in ((below, "pass-q"), (above, "pass-kv")):
            if 1 <= t < context:
                assert choose_variant(t, context - t, **args) == want, (context, t, m)
                checked += 1
    assert checked >= 6


def test_the_crossover_in_plan_records():
    cfg, prof = get_preset("llama3-405b"), PROFILES["h100-rdma"]
    one, sixteen = (plan_prefill(cfg, prof, cp=n, tp=8, context=131072) for n in (1, 16))
    assert one.crossover_miss_rate == 0.0  # no ring, no pass-Q
    want = crossover_miss_rate(131072, cp=16, bytes_per_element=2, tp=8,
                               hardware=prof.selector_hardware(), **LLAMA_405B_HEADS)  # fmt: skip
    assert sixteen.crossover_miss_rate == want == predicted_crossover(cfg, prof, cp=16,
                                                                      context=131072)  # fmt: skip
    assert 0 < want < 0.125  # below Eq. 1's 12.5%: the All2All and Eq. 2 both lower it


def test_bench_model_prints_predictions_only_with_a_profile(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rec = {"preset": "tiny-llama", "seq_len": 1024, "cp": 2, "exchange": "auto",
           "ttft_s": 0.07, "ttit_s": 0.007, "efficiency": 0.5}  # fmt: skip
    assert "predicted" not in bench._table([rec])  # unchanged without --profile
    prof = ClusterProfile.from_calibration(_write(tmp_path, CPU_PROFILE))
    bench._predict(rec, prof)
    want = predict_benchmark(get_preset("tiny-llama"), prof, cp=2, prompt_tokens=1024)
    assert (rec["predicted_ttft_s"], rec["predicted_ttit_s"]) == (want.ttft_s, want.ttit_s)
    header = bench._table([rec]).splitlines()[0].split()
    assert header[4:8] == ["ttft_s", "predicted_ttft_s", "ttit_ms", "predicted_ttit_ms"]
