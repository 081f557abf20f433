"""The processes of a running ``cp_infer serve``, found from outside it (tests and tools that
kill a rank's engine): each rank's keeper, the process its launcher started, and the keeper's
forked engine (:mod:`cp_infer.serving.supervisor`). Linux only: it reads ``/proc``."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["engine_pids", "server_processes"]


def server_processes(port: int, exclude: int | None = None) -> dict[int, tuple[int, int]]:
    """pid -> (rank, parent pid) of the processes of the server on ``port`` that know their
    rank: each rank's keeper (the process the launcher started) and its engine (the keeper's
    fork, whose parent is a keeper)."""
    out = subprocess.run(["pgrep", "-f", f" serve .*--port {port}( |$)"],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    found = {}
    for pid in (int(p) for p in out if int(p) != exclude):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        rank = next((e[5:] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[pid] = (int(rank), ppid)
    return found


def engine_pids(port: int) -> dict[int, int]:
    """rank -> pid of each rank's engine of the server on ``port``."""
    found = server_processes(port)
    return {rank: pid for pid, (rank, ppid) in found.items() if ppid in found}
