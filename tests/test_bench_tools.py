"""The benchmarks at a tiny size: bench_peers' approaches run, are exact and are counted, and
bench_attention (whose pieces bench_peers reuses) still runs.

Each tool runs in this process through ``main(argv)``; their worker pools are spawned as in a real
run (tools/ is on sys.path so the workers can import them).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys

import pytest
import torch

from tests.cli_runner import REPO

sys.path.insert(0, str(REPO / "tools"))
bench_peers = importlib.import_module("bench_peers")

TINY = ["--seq-lens", "256", "--world", "2", "--heads", "4", "--head-dim", "32",
        "--repeats", "1", "--warmup", "0"]  # fmt: skip


@pytest.mark.timeout(120)
def test_bench_peers_all_approaches_exact(tmp_path):
    out = tmp_path / "peers.json"
    assert bench_peers.main([*TINY, "--kv-heads", "2", "--json", str(out)]) == 0
    records = {r["approach"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"local", *bench_peers.APPROACHES}
    for name in bench_peers.APPROACHES:
        r = records[name]
        assert (r["seq_len"], r["world"], r["heads"], r["kv_heads"]) == (256, 2, 4, 2)
        assert r["max_abs_err"] < 1e-5, (name, r["max_abs_err"])
        assert r["bytes_sent_per_rank"] > 0
        assert 0 < r["best_s"] <= r["median_s"] and r["efficiency"] > 0
    # one rank's K/V shard (2 KV heads x 128 tokens x 32 x 4 bytes, K and V) to the other rank
    kv_shard = 2 * 2 * 128 * 32 * 4
    for name in ("pass-kv", "torch-ring", "allgather-kv"):
        assert records[name]["bytes_sent_per_rank"] == kv_shard
    # half of Q, K, V forth and of the output back
    assert records["ulysses"]["bytes_sent_per_rank"] == (2 * 4 * 128 * 32 * 4 + kv_shard) // 2


@pytest.mark.timeout(120)
def test_bench_peers_skips_ulysses_and_fails_when_inexact(tmp_path, caplog):
    out = tmp_path / "peers.json"
    argv = [*TINY, "--kv-heads", "1", "--approaches", "pass-kv", "ulysses", "--json", str(out)]
    with caplog.at_level(logging.INFO, logger="bench_peers"):
        # an impossible bound: the run itself is fine, the check must fail it
        assert bench_peers.main([*argv, "--atol", "-1"]) == 1
    assert any("skipping ulysses" in m for m in caplog.messages)
    assert any("pass-kv at seq_len=256 is not exact" in m for m in caplog.messages)
    assert not any("ulysses at" in m for m in caplog.messages)
    assert not out.exists()


def test_sequence_order_round_trip():
    n, c = 3, 2
    ranks = [torch.tensor([[[float(r * 10 + i)] for i in range(2 * c)]]) for r in range(n)]
    x = torch.stack(ranks)  # (N, 1, 2c, 1): rank r holds chunks r and 2N-1-r
    seq = bench_peers.to_sequence_order(x, n)
    # chunks 0..5 of 2 tokens: ranks 0 1 2 (first halves), then 2 1 0 (second halves)
    assert seq.flatten().tolist() == [0, 1, 10, 11, 20, 21, 22, 23, 12, 13, 2, 3]
    assert torch.equal(bench_peers.to_rank_order(seq, n), x)


@pytest.mark.timeout(120)
def test_bench_attention_runs(tmp_path):
    """bench_peers reuses bench_attention's inputs, kernels and timing: it must still run."""
    bench_attention = importlib.import_module("bench_attention")
    out = tmp_path / "attention.json"
    records = bench_attention.main(
        ["--seq-lens", "256", "--cp", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
         "--repeats", "1", "--warmup", "0", "--json", str(out)]
    )  # fmt: skip
    assert [r["variant"] for r in records] == ["local", "pass-kv", "pass-q", "torch-ring"]
    assert json.loads(out.read_text()) == records


@pytest.mark.timeout(180)
def test_bench_step_times_the_three_kinds_of_step(tmp_path):
    bench_step = importlib.import_module("bench_step")
    out = tmp_path / "step.json"
    records = bench_step.main(["--preset", "tiny-llama", "--cp", "2", "--cached", "256",
                               "--chunks", "16", "32", "--decodes", "2", "--steps", "2",
                               "--json", str(out)])  # fmt: skip
    *steps, engine = records
    assert [(r["kind"], r["chunk"]) for r in steps] == [
        (kind, chunk) for chunk in (16, 32) for kind in ("decode", "prefill", "mixed")
    ]
    for r in steps:
        assert r["step_s"] > 0 and r["fixed_s"] == pytest.approx(r["step_s"] - r["flops_s"])
    chunk_16, chunk_32 = (r["flops_s"] for r in steps if r["kind"] == "prefill")
    assert chunk_32 > chunk_16  # a bigger chunk: more FLOPs
    # the engine's decode iterations, part by part: one plan each, every part measured
    assert engine["kind"] == "engine" and engine["iterations"] == 2
    parts = engine["per_iteration_s"]
    assert all(v > 0 for v in parts.values()), parts
    assert parts["leader: decide"] + parts["leader: send"] < parts["iteration"]
    assert json.loads(out.read_text()) == records


def test_bench_sampling_times_top_p_both_ways(tmp_path):
    bench_sampling = importlib.import_module("bench_sampling")
    out = tmp_path / "sampling.json"
    argv = ["--vocab", "3000", "--rows", "2", "--scales", "1", "8", "--repeats", "1",
            "--json", str(out)]  # fmt: skip
    assert bench_sampling.main(argv) == 0
    records = json.loads(out.read_text())
    assert len(records) == 6 and all(r["ms"] > 0 for r in records)
    assert {r["sampling"] for r in records} == {
        "temperature",
        "top-p, full sort",
        "top-p, top-1024 first",
    }


@pytest.mark.timeout(240)
def test_bench_disagg_reports_the_three_figures(tmp_path):
    bench_disagg = importlib.import_module("bench_disagg")
    out = tmp_path / "disagg.json"
    records = bench_disagg.main(["--preset", "tiny-llama", "--clients", "2", "--prompt-len", "32",
                                 "--warm-tokens", "4", "--long-len", "2048",
                                 "--disagg-min-tokens", "512", "--kv-memory", "16MiB",
                                 "--modes", "disaggregated", "--json", str(out)])  # fmt: skip
    [r] = records
    assert r["mode"] == "disaggregated" and r["gaps"] > 0
    assert 0 < r["tbt_p50_s"] <= r["tbt_p99_s"] and r["ttft_s"] > 0
    assert json.loads(out.read_text()) == records


def test_bench_startup_opens_a_gguf_file_with_both_readers(tmp_path, capsys):
    pytest.importorskip("gguf")
    from tests.gguf_helpers import write_tiny_gguf

    bench_startup = importlib.import_module("bench_startup")
    path = write_tiny_gguf(tmp_path / "t.gguf", "Q8_0")
    records = bench_startup.main(["--gguf", str(path), "--repeats", "1", "--json",
                                  str(tmp_path / "s.json")])  # fmt: skip
    assert [r["reader"] for r in records] == ["cp_infer", "gguf.GGUFReader"]
    assert all(r["what"] == "gguf-open" and r["cpu_s"] >= 0 for r in records)
    assert json.loads((tmp_path / "s.json").read_text()) == records
    assert "gguf.GGUFReader" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # nothing to measure: --help's error, not a silent run
        bench_startup.main([])


def test_suite_cost_counts_every_python_process_of_a_run(tmp_path, capsys):
    suite_cost = importlib.import_module("suite_cost")
    tests = tmp_path / "test_tiny.py"
    tests.write_text(
        "import subprocess, sys\n\n"
        "def test_starts_a_child():\n"
        "    subprocess.run([sys.executable, '-c', 'sum(range(10**6))'], check=True)\n"
    )
    out = tmp_path / "cost.json"
    result = suite_cost.main(["--json", str(out), "--", str(tests)])
    assert json.loads(out.read_text())["by_kind"] == result["by_kind"]
    kinds = {r["kind"]: r for r in result["processes"]}
    assert set(kinds) == {"pytest", "spawned"}  # the child is a `python -c`
    assert f"{tests.name}::test_starts_a_child" in kinds["spawned"]["test"]  # (rootdir-relative)
    logged = sum(r["cpu_s"] for r in result["processes"])
    assert 0 < logged <= result["total_cpu_s"] + 0.05  # (rusage rounds to the clock tick)
    assert result["by_kind"]["unlogged"]["cpu_s"] >= 0 and result["exit_code"] == 0
    assert "pytest exit code 0" in capsys.readouterr().out
    tests.write_text("def test_fails():\n    assert False\n")
    with pytest.raises(SystemExit) as failed:  # a failing suite fails the tool
        suite_cost.main(["--", str(tests)])
    assert failed.value.code == 1


def test_bench_placement_finds_where_the_ring_s_ttft_falls_below_one_rank_s():
    bench_placement = importlib.import_module("bench_placement")
    lengths = [8, 16, 32, 64]
    ring = {8: 3.0, 16: 3.0, 32: 2.0, 64: 1.0}
    rank = {8: 1.0, 16: 2.0, 32: 4.0, 64: 8.0}
    # above at 16 (1.5x), below at 32 (0.5x): the log ratios cross at 16 * 2**(log1.5/log3)
    found = bench_placement.crossover(lengths, ring, rank)
    assert found == pytest.approx(16 * 2 ** (0.405465 / 1.098612), rel=1e-5)
    assert bench_placement.crossover(lengths, rank, {n: 0.5 for n in lengths}) is None
    assert bench_placement.crossover(lengths, {n: 0.5 for n in lengths}, rank) == 8.0
    # a dip below that comes back above does not count: the last length above decides
    assert bench_placement.crossover(lengths, {**ring, 8: 0.1}, rank) == found


@pytest.mark.timeout(300)
def test_bench_placement_runs_both_servers_and_compares_the_model(tmp_path):
    bench_placement = importlib.import_module("bench_placement")
    out = tmp_path / "placement.json"
    record = bench_placement.main(["--preset", "tiny-llama", "--lengths", "4", "64",
                                   "--repeats", "1", "--json", str(out)])  # fmt: skip
    assert record["lengths"] == [4, 64]
    assert all(t > 0 for t in record["ring_ttft_s"] + record["rank_ttft_s"])
    assert record["predicted_threshold"] >= 1 and record["hardware"] == "cpu-gloo"
    assert json.loads(out.read_text()) == record
