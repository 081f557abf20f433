"""Small helpers shared by the CLI and the benchmarks: atomic files, text tables, timing."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "atomic_files",
    "atomic_write",
    "check_writable",
    "format_table",
    "time_interleaved",
    "time_on_all_ranks",
    "write_json",
]


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


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Times of ``repeats`` calls of every fn (each the slowest rank's), after ``warmup`` rounds.

    Calls are interleaved round by round (f1 f2 f3, f1 f2 f3, ...) so that drift in the
    machine's speed affects all of them alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            time_on_all_ranks(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_on_all_ranks(fn))
    return times


def check_writable(path: Path, flag: str) -> None:
    """ValueError naming ``flag`` unless ``path`` can be created (or replaced) as a file.

    Checks without writing anything: ``path`` is not a directory, the nearest existing
    ancestor is a directory (not a file) and is writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path, e.g. {path / 'out'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"{flag} {path} lies under {parent}, which is a file, not a directory; "
            "choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {parent} (permission denied)")


@contextlib.contextmanager
def atomic_files(*paths: Path) -> Iterator[list[Path]]:
    """Temporary files beside ``paths``, renamed onto them only if the block succeeds.

    All or nothing: if the block raises, every temporary file is removed and no target is
    touched. Temporary names are unique (``.NAME.PID.XXXX.tmp``), so runs never collide.
    """
    tmps: list[Path] = []
    try:
        for path in map(Path, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            tmp.touch(exist_ok=False)  # the usual permissions (umask), unlike mkstemp's 0600
            tmps.append(tmp)
        yield list(tmps)
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then rename: never a half-written file."""
    with atomic_files(path) as (tmp,):
        write(tmp)


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns with a rule under the header."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
