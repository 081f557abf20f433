"""How the server's ranks stop: on a signal, when a rank dies, and when their launcher is gone.

- **A signal** (SIGINT, SIGTERM) to rank 0 ends every live request at once (streams get
  ``finish_reason: "abort"``), closes the HTTP server and sends the other ranks ``stop``. The
  other ranks wait for that message, and exit on their own after :data:`STOP_GRACE_S` if it
  does not come (a signal sent to them alone, or a rank 0 that is stuck).
- **A rank that dies** is seen by every other rank's :class:`Watchdog`. A rank on the same
  host is looked up by its process id, which tells at once and never mistakes a slow rank (a
  loaded host) for a dead one (:meth:`Watchdog.dead_peer`). A rank on another host stops
  beating: every rank adds to its own counter in the rendezvous store every :data:`BEAT_S`,
  and a remote rank's counter that stands still for ``dead_after_s`` means it is gone. Rank 0
  then ends the live requests with an error event naming the rank and every rank exits
  non-zero. (A collective with the dead rank usually fails sooner; the watchdog also covers
  ranks waiting on shared memory.)
- **A launcher that is gone** (killed, say: torchrun starts every rank in a session of its own,
  so nothing else would reach them) is seen as the parent process changing, or the rendezvous
  store it hosts going away. The ranks then stop as for a dead rank.

Nothing here leaves files behind: the shared-memory exchange's segment is unlinked as soon as
every rank has mapped it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

__all__ = [
    "BEAT_S", "STOP_GRACE_S", "Watchdog", "follower_signals", "process_running",
]  # fmt: skip

logger = logging.getLogger(__name__)

BEAT_S = 0.5  # seconds between heartbeats
STOP_GRACE_S = 3.0  # a rank told to stop exits by itself after this long


def follower_signals() -> None:
    """On a rank other than 0: SIGINT or SIGTERM lets rank 0 lead the stop, and exits this
    rank after :data:`STOP_GRACE_S` if rank 0 does not."""

    from cp_infer.distributed import exit_now  # the ranks' side: torch is loaded there

    def handle(sig, _frame) -> None:
        logger.info("%s: stopping when rank 0 says so", signal.Signals(sig).name)
        timer = threading.Timer(STOP_GRACE_S, exit_now, args=(0,))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


class Watchdog:
    """A thread that beats for this rank and watches the other ranks and the launcher.

    Args:
        on_failure: called once, from the watchdog's thread, with a message naming what
            failed (a rank, the launcher).
        run_id: keys this run's heartbeats in the store (the same on every rank).
        watch_parent: the launcher is this process's parent: its death stops the rank.
        dead_after_s: a peer on another host whose counter stands still this long is dead
            (one on this host is watched by its process id).
    """

    def __init__(
        self, on_failure: Callable[[str], None], *, run_id: str, watch_parent: bool,
        dead_after_s: float = 5.0,
    ) -> None:  # fmt: skip
        self.on_failure, self.dead_after_s = on_failure, dead_after_s
        import torch.distributed as dist  # the ranks' side (the API process never gets here)

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.parent = os.getppid() if watch_parent else None
        self._keys = [f"cp_infer/heartbeat/{run_id}/{r}" for r in range(self.world)]
        self._where = [f"cp_infer/process/{run_id}/{r}" for r in range(self.world)]
        self._stop = threading.Event()
        self._store = self._connect()
        self._local = self._peers_on_this_host()  # rank -> pid
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    @staticmethod
    def _connect():
        """A store client of its own (the default group's is used by the main thread)."""
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            return None
        import torch.distributed as dist

        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=5))

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        # the beats of the ranks on other hosts (those here are watched by their pids: a
        # loaded host once held a live rank's beats back 5 s, and its peer stopped the server)
        seen = {r: (-1, time.monotonic()) for r in range(self.world)
                if r != self.rank and r not in self._local}  # fmt: skip
        while not self._stop.wait(BEAT_S):
            failure = self._check(seen)
            if failure is not None and not self._stop.is_set():
                logger.error("%s", failure)
                self.on_failure(failure)
                return

    def dead_peer(self) -> str | None:
        """A rank on this host whose process is gone, at once (no waiting for beats)."""
        for rank, pid in self._local.items():
            if not process_running(pid):
                return f"rank {rank} (pid {pid}) died"
        return None

    def _peers_on_this_host(self) -> dict[int, int]:
        """The other ranks on this host and their pids, once every rank has said where it
        runs (known before anything can fail)."""
        if self._store is None:
            return {}
        host = socket.gethostname()
        self._store.set(self._where[self.rank], f"{host} {os.getpid()}")
        self._store.wait(self._where, timedelta(seconds=60))
        local = {}
        for r in range(self.world):
            where, pid = self._store.get(self._where[r]).decode().rsplit(" ", 1)
            if r != self.rank and where == host:
                local[r] = int(pid)
        return local

    def _check(self, seen: dict[int, tuple[int, float]]) -> str | None:
        if self.parent is not None and os.getppid() != self.parent:
            return f"the launcher (pid {self.parent}) is gone"
        dead = self.dead_peer()
        if dead is not None:
            return dead
        if self._store is None:
            return None
        now = time.monotonic()
        try:
            self._store.add(self._keys[self.rank], 1)
            counts = {r: self._store.add(self._keys[r], 0) for r in seen}
        except Exception as e:  # the store lives in the launcher (torchrun) or rank 0
            return f"lost the rendezvous store ({type(e).__name__}): the launcher or rank 0 is gone"
        for r, count in counts.items():
            last, since = seen[r]
            if count != last:
                seen[r] = (count, now)
            elif now - since > self.dead_after_s:
                return f"rank {r} stopped responding (no heartbeat for {self.dead_after_s:.0f}s)"
        return None


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        try:  # no /proc: ask the kernel
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
