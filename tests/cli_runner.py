"""Run ``python -m cp_infer ...`` in-process on every rank of a pool, and capture what it logs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cp_infer.cli import main
from cp_infer.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CliRun:
    """One rank's view of a command: its exit code and what it logged (INFO and up on rank 0,
    WARNING and up elsewhere)."""

    code: int
    messages: list[str]
    errors: list[str]
    tracebacks: int  # error records logged with a traceback


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_cli(argv: list[str]) -> CliRun:
    """``main(argv)`` on this rank (run it on every rank: ``dist_pool(n).run(run_cli, argv)``)."""
    capture = _Capture()
    logger = logging.getLogger("cp_infer")
    logger.addHandler(capture)
    try:
        code = main(argv)
    finally:
        logger.removeHandler(capture)
    return CliRun(
        code=code,
        messages=[r.getMessage() for r in capture.records],
        errors=[r.getMessage() for r in capture.records if r.levelno >= logging.ERROR],
        tracebacks=sum(r.exc_info is not None for r in capture.records),
    )


def _launch(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def torchrun(nproc: int, args: list[str], *, timeout: float = 180, script: str | None = None):
    """``torchrun --nproc-per-node N -m cp_infer ARGS`` (or ``script``) as a subprocess."""
    target = [script] if script else ["-m", "cp_infer"]
    return _launch(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "--master-port", str(free_port()), *target, *args],
        timeout,
    )  # fmt: skip


def deepspeed(nproc: int, target: list[str], args: list[str], *, timeout: float = 180):
    """``deepspeed --num_gpus N TARGET ARGS`` (TARGET: ``--module cp_infer`` or a script)."""
    exe = Path(sys.executable).with_name("deepspeed")
    return _launch(
        [str(exe), "--num_gpus", str(nproc), "--master_port", str(free_port()), *target, *args],
        timeout,
    )
