"""Run a function on every rank of a CPU gloo world, for tests and benchmarks.

A :class:`DistributedPool` starts ``world_size`` worker processes once (spawn), joins them into a
gloo process group with a short timeout, and then runs any number of functions on all of them.
Starting processes and importing torch is the slow part on a 2-core machine, so tests share one
pool per world size.

Guarantees a test suite needs:

- Nothing hangs: every call has a deadline; a worker stuck in a collective is killed and the pool
  is rebuilt for the next call.
- A failing rank fails the call with its own traceback (all ranks' tracebacks are collected).
- Results come back to the caller, one per rank, so assertions can also run in the parent.

The function run on the workers must be importable (defined at module level).
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cp_infer.distributed import free_port

__all__ = ["DistributedError", "DistributedPool", "free_port"]


class DistributedError(RuntimeError):
    """One or more ranks raised, or the call ran past its deadline."""


@dataclass(frozen=True)
class _Task:
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict


def _worker(
    rank: int,
    world_size: int,
    port: int,
    pg_timeout_s: float,
    threads: int,
    tasks: mp.Queue,
    results: mp.Queue,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=str(threads),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
    except Exception:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        try:
            out = task.fn(*task.args, **task.kwargs)
            results.put((rank, True, out))
        except BaseException:  # report everything, including SystemExit from argparse
            results.put((rank, False, traceback.format_exc()))
    results.close()
    results.join_thread()


class DistributedPool:
    """``world_size`` CPU processes joined in a gloo group, reused across calls.

    Args:
        world_size: number of ranks.
        pg_timeout_s: timeout of the default process group (collectives fail after it).
        threads: torch intra-op threads per rank.
    """

    def __init__(self, world_size: int, *, pg_timeout_s: float = 60.0, threads: int = 1) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.pg_timeout_s = pg_timeout_s
        self.threads = threads
        self.grace_s = 5.0  # how long the other ranks may take to report after a failure
        self._procs: list[mp.process.BaseProcess] = []
        self._tasks: list[mp.Queue] = []
        self._results: mp.Queue | None = None

    # -- life cycle -------------------------------------------------------------------------
    def _start(self, deadline_s: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    self.world_size,
                    port,
                    self.pg_timeout_s,
                    self.threads,
                    self._tasks[r],
                    self._results,
                ),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect(deadline_s, what="process group start-up")

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        for q in self._tasks:
            with contextlib.suppress(OSError, ValueError):
                q.put(None)
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        for q in [*self._tasks, *([self._results] if self._results is not None else [])]:
            q.cancel_join_thread()
            q.close()
        self._procs, self._tasks, self._results = [], [], None

    def __enter__(self) -> DistributedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running ----------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0, **kwargs: Any):
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results.

        Raises:
            DistributedError: a rank raised (its traceback is in the message) or the call ran
                past ``timeout_s``. The pool is rebuilt on the next call in both cases.
        """
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self._kill()
            self._start()
        task = _Task(fn, args, kwargs)
        for q in self._tasks:
            q.put(task)
        return self._collect(timeout_s, what=getattr(fn, "__qualname__", repr(fn)))

    def _collect(self, timeout_s: float, what: str) -> list[Any]:
        assert self._results is not None
        deadline = time.monotonic() + timeout_s
        outs: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(outs) + len(errors) < self.world_size and time.monotonic() < deadline:
            try:
                rank, ok, payload = self._results.get(timeout=1.0)
                (outs if ok else errors)[rank] = payload
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if not p.is_alive() and r not in outs and r not in errors:
                        errors[r] = f"worker process died (exit code {p.exitcode})"
            if errors:
                # After the first failure the other ranks get a short grace period to report:
                # they are most likely blocked in a collective the failed rank never joins.
                deadline = min(deadline, time.monotonic() + self.grace_s)
        if errors or len(outs) < self.world_size:
            missing = [r for r in range(self.world_size) if r not in outs and r not in errors]
            self._kill()
            parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
            if missing:
                parts.append(f"ranks {missing} did not finish within {timeout_s:.0f}s")
            raise DistributedError(
                f"{what} failed at world_size={self.world_size}:\n" + "\n".join(parts)
            )
        return [outs[r] for r in range(self.world_size)]
