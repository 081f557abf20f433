"""Shared fixtures: one gloo worker pool per world size, reused by every test of the session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cp_infer.testing import DistributedPool
from tests.serve_helpers import Server, make_checkpoint


class _Pools:
    def __init__(self) -> None:
        self._pools: dict[int, DistributedPool] = {}

    def __call__(self, world_size: int) -> DistributedPool:
        if world_size not in self._pools:
            self._pools[world_size] = DistributedPool(world_size, pg_timeout_s=60.0)
        return self._pools[world_size]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def dist_pool():
    """``dist_pool(world_size).run(fn, *args)`` runs ``fn`` on every rank and returns results."""
    pools = _Pools()
    yield pools
    pools.close()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """tiny-llama as a Hugging Face checkpoint with a word tokenizer, for the server tests
    (read only: every test of the session shares it)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory):
    """``server_pool(checkpoint, nproc, args)``: a server started once per session for those
    arguments, shared by every test that only sends it requests (one that stops, kills or
    breaks its server starts its own)."""
    servers: dict[tuple, Server] = {}

    def get(checkpoint: Path, nproc: int, args: list[str]) -> Server:
        key = (str(checkpoint), nproc, tuple(args))
        if key not in servers:
            log = tmp_path_factory.mktemp("serve") / "serve.log"
            servers[key] = Server(checkpoint, nproc, list(args), log)
        return servers[key]

    yield get
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="session")
def server(server_pool, checkpoint):
    """The server at CP=2 on ``checkpoint``, shared by the session's tests."""
    return server_pool(checkpoint, 2, ["--cp", "2"])


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """The trained model of the real-weight tests: (its GGUF file, its conversion to a Hugging
    Face directory, made once per session). Skips when it is not installed (make setup)."""
    from cp_infer.checkpoint.bundled import smollm2_path

    try:
        gguf = smollm2_path()
    except ValueError as e:
        pytest.skip(str(e))
    hf = tmp_path_factory.mktemp("smollm2") / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "cp_infer", "convert", "--from", "gguf", "--to", "hf",
         "--input", str(gguf), "--output", str(hf)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return gguf, hf
