"""Two hosts on one machine (cp_infer.testing.hosts): each launcher in its own UTS, mount and
PID namespaces, rendezvous over loopback. CP across the hosts with TP inside each gives one
host's tokens, the shared-memory exchange stays inside a host, and a rank killed on one host
stops every rank on both."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from cp_infer.testing.hosts import EmulatedHosts, namespaces_unavailable
from tests.cli_runner import REPO

_WHY = namespaces_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def test_the_documented_two_host_run_matches_one_host(tmp_path):
    """examples/two_hosts.sh, the commands docs/checkpoints.md shows: tp=2 inside each host,
    cp=2 across them, against the same job on one host of 4 ranks."""
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "two_hosts.sh"), str(tmp_path)], capture_output=True,
        text=True, cwd=REPO, env={**os.environ, "PYTHON": sys.executable}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "give one host's tokens" in proc.stdout
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
