"""Small helpers shared by the CLI and the benchmarks: atomic files, text tables, timing."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["atomic_write", "format_table", "time_on_all_ranks", "write_json"]


def time_on_all_ranks(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn`` on every rank, the slowest rank's.

    A ring finishes when all its ranks do; the barrier lines the ranks up first.
    """
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return dt.item()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns with a rule under the header."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
