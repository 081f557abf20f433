"""calibrate measures this machine into a profile that --hardware takes."""

from __future__ import annotations

import json

import pytest

from cp_infer.attention.selector import Hardware
from cp_infer.cli import main


def test_calibrate_writes_a_profile_that_generate_uses(tmp_path, dist_pool):
    profile = tmp_path / "profile.json"
    argv = ["calibrate", "--output", str(profile), "--tokens", "256", "--message-mib", "1",
            "--repeats", "1"]  # fmt: skip
    assert main(argv) == 0
    p = json.loads(profile.read_text())
    for key in ("attention_flops", "gemm_flops", "ring_bandwidth", "ring_latency_s", "all2all_s"):
        assert p[key] > 0, key
    hw = Hardware.from_profile(profile)
    assert hw.flops == p["attention_flops"] and hw.bandwidth == p["ring_bandwidth"]
    out = tmp_path / "o.jsonl"
    argv = ["generate", "--preset", "tiny-llama", "--cp", "2", "--hardware", str(profile),
            "--input", "examples/prompts.jsonl", "--output", str(out)]  # fmt: skip
    assert dist_pool(2).run(main, argv, timeout_s=120) == [0, 0]
    assert out.exists()


def test_a_file_that_is_no_profile_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"flops": 1}')
    with pytest.raises(ValueError, match="not a profile from `python -m cp_infer calibrate`"):
        Hardware.from_profile(bad)
