"""calibrate measures this machine into a profile that generate and plan --hardware take."""

from __future__ import annotations

import json

import pytest

from cp_infer.cli import main
from cp_infer.hardware import Profile


def test_calibrate_writes_a_profile_that_generate_uses(tmp_path, dist_pool):
    profile = tmp_path / "profile.json"
    argv = ["calibrate", "--output", str(profile), "--tokens", "256", "--message-mib", "1",
            "--memory-mib", "8", "--repeats", "1", "--min-seconds", "0"]  # fmt: skip
    assert main(argv) == 0
    p = json.loads(profile.read_text())
    for key in ("attention_flops", "gemm_flops", "ring_bandwidth", "ring_latency_s", "all2all_s",
                "memory_bandwidth", "host_memory_bytes"):  # fmt: skip
        assert p[key] > 0, key
    assert 0 <= p["overlap"] <= 1  # how much of a ring step hides behind attention here
    prof = Profile.from_calibration(profile)  # Alg. 1's C and BW, plan's machine, the chunks'
    hw = prof.selector()
    assert hw.flops == pytest.approx(p["attention_flops"]) and hw.bandwidth == p["ring_bandwidth"]
    assert prof.hbm_bytes_s == p["memory_bandwidth"] and prof.devices_per_host == 1
    assert prof.overlap == p["overlap"]
    plan = tmp_path / "plan.json"
    assert main(["plan", "--preset", "tiny-llama", "--hardware", str(profile), "--context",
                 "1024", "--cp", "1,2", "--json", str(plan)]) == 0  # fmt: skip
    assert all(r["ttft_s"] > 0 and r["tp"] == 1 for r in json.loads(plan.read_text()))
    out = tmp_path / "o.jsonl"
    argv = ["generate", "--preset", "tiny-llama", "--cp", "2", "--hardware", str(profile),
            "--input", "examples/prompts.jsonl", "--output", str(out)]  # fmt: skip
    assert dist_pool(2).run(main, argv, timeout_s=120) == [0, 0]
    assert out.exists()


def test_a_file_that_is_no_profile_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"flops": 1}')
    with pytest.raises(ValueError, match="not a profile from `python -m cp_infer calibrate`"):
        Profile.from_calibration(bad)
