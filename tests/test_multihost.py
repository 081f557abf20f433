"""Two hosts on one machine (cp_infer.testing.hosts): each launcher in its own UTS, mount and
PID namespaces, rendezvous over loopback. CP across the hosts with TP inside each gives one
host's tokens (generate and serve), the shared-memory exchange stays inside a host, a rank
killed on one host stops every rank on both, and a disaggregated server spans them."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

import httpx
import pytest

from cp_infer.distributed import free_port
from cp_infer.testing.hosts import EmulatedHosts, namespaces_unavailable
from tests.cli_runner import REPO, run_cli

_WHY = namespaces_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def test_the_documented_two_host_run_matches_one_host(tmp_path):
    """examples/two_hosts.sh, the commands docs/checkpoints.md shows: tp=2 inside each host,
    cp=2 across them, against the same job in one process."""
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "two_hosts.sh"), str(tmp_path)], capture_output=True,
        text=True, cwd=REPO, env={**os.environ, "PYTHON": sys.executable}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "give one process's tokens" in proc.stdout
    log = (tmp_path / "host0.log").read_text()
    # rank 0's TP group [0, 1] is on its host: shared memory; its CP group [0, 2] spans both
    assert "exchange over ranks [0, 1] (one host): shm" in log
    assert "exchange over ranks [0, 2] (2 hosts): collective" in log
    assert (tmp_path / "two_hosts.jsonl").read_text().count("token_ids") == 3
    # the docs show the script's launch, line for line
    docs = (REPO / "docs" / "checkpoints.md").read_text()
    script = (REPO / "examples" / "two_hosts.sh").read_text()
    launch = re.search(r"host\(\) \{\n(.*?)\n\}", script, re.S).group(1)
    for line in launch.splitlines():
        assert line.strip() in docs, line


def test_a_rank_killed_on_one_host_stops_both(tmp_path):
    """Global rank 3 (host 1) is killed with SIGKILL after its prefill, while the other ranks
    go on into decode's collectives: every launcher on both hosts exits non-zero, seconds
    later, not after a collective's timeout."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "token_ids": [1, 2, 3, 4, 5]}\n')
    stamp = tmp_path / "killed_at"
    target = [str(REPO / "tests" / "kill_rank.py"), "generate", "--preset", "tiny-llama",
              "--tp", "2", "--cp", "2", "--max-new-tokens", "64", "--timeout", "120",
              "--input", str(prompts), "--output", str(tmp_path / "out.jsonl")]  # fmt: skip
    env = {"CP_INFER_KILL_RANK": "3", "CP_INFER_KILL_STAMP": str(stamp),
           "PYTHONPATH": str(REPO)}  # fmt: skip
    with EmulatedHosts(2, 2, target, env=env, cwd=REPO) as hosts:
        runs = hosts.wait(timeout=240)
    killed_at = float(stamp.read_text())
    for run in runs:
        assert run.returncode != 0, (run.host, run.stderr[-2000:])
        assert run.exited_at - killed_at < 15, (run.host, run.exited_at - killed_at)
    assert not (tmp_path / "out.jsonl").exists()  # no half-written output
    assert time.monotonic() - killed_at < 60


@pytest.fixture(scope="module")
def one_host(checkpoint, dist_pool, tmp_path_factory):
    """Three prompts (two of them long), and their greedy tokens from one host at cp=2."""
    g = random.Random(11)
    prompts = [[g.randrange(1, 500) for _ in range(n)] for n in (300, 5, 120)]
    tmp = tmp_path_factory.mktemp("one_host")
    path = tmp / "p.jsonl"
    path.write_text("".join(json.dumps({"token_ids": p}) + "\n" for p in prompts))
    runs = dist_pool(2).run(run_cli, ["generate", "--checkpoint", str(checkpoint), "--cp", "2",
                                      "--max-new-tokens", "6", "--input", str(path),
                                      "--output", str(tmp / "want.jsonl")])  # fmt: skip
    assert all(r.code == 0 for r in runs), runs[0].errors
    return prompts, [
        json.loads(x)["token_ids"] for x in (tmp / "want.jsonl").read_text().splitlines()
    ]


def _serve_on_two_hosts(checkpoint, args: list[str], prompts) -> tuple[list, str, list]:
    """A server of two hosts of 2 ranks each: its greedy answers to ``prompts``, its metrics,
    and each host's run (stopped)."""
    port = free_port()
    target = ["-m", "cp_infer", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
              "--kv-cache-memory", "4MiB", *args]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with EmulatedHosts(2, 2, target, cwd=REPO) as hosts:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in hosts._procs):
                hosts.kill()
                pytest.fail("the two-host server did not come up: " + str(hosts.wait(30)))
            time.sleep(0.1)
        got = []
        for p in prompts:
            r = httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 6,
                                                          "temperature": 0}, timeout=120)  # fmt: skip
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["token_ids"])
        metrics = httpx.get(url + "/metrics", timeout=30).text
        hosts.kill()
        runs = hosts.wait(30)
    return got, metrics, runs


def test_a_server_with_cp_across_two_hosts_matches_one_host(checkpoint, one_host):
    """tp=2 inside each host, cp=2 across them (serve --tp 2 --cp 2): one host's tokens; TP's
    sums take shared memory, CP's ring the network."""
    prompts, want = one_host
    got, _, runs = _serve_on_two_hosts(checkpoint, ["--tp", "2", "--cp", "2"], prompts)
    assert got == want
    assert "exchange over ranks [0, 1] (one host): shm" in runs[0].stderr, runs[0].stderr[-3000:]
    assert "exchange over ranks [0, 2] (2 hosts): collective" in runs[0].stderr


def test_the_disaggregated_server_across_two_hosts(checkpoint, one_host):
    """Prefill tier (tp=1, cp=2) on host 0, decode tier (tp=2) on host 1: the KV hand-off
    crosses hosts, each tier's own exchanges stay in shared memory; greedy answers equal a
    colocated run's."""
    prompts, want = one_host
    got, metrics, _ = _serve_on_two_hosts(
        checkpoint, ["--prefill", "tp=1,cp=2", "--decode", "tp=2", "--disagg-min-tokens", "64"],
        prompts,
    )  # fmt: skip
    assert got == want
    assert "cp_infer_disagg_prefills_total 2.0" in metrics  # the 300- and 120-token prompts
