"""Several hosts on one machine: one launcher per emulated host, each in its own Linux UTS,
mount and PID namespaces (its own hostname, its own ``/dev/shm``), rendezvous over loopback.

What differs between two real hosts, as this project sees it, is the hostname (the engine keeps
its shared-memory exchanges inside a host: :func:`cp_infer.collectives.make_exchange`) and
``/dev/shm`` (which a peer on another host cannot map); both are per host here. The PID
namespace makes the launcher the host's first process: when it goes, every rank of the host
goes with it, so a test that times out leaves nothing behind.

``examples/two_hosts.sh`` is the same launch as a shell script (docs/checkpoints.md)::

    unshare --uts --mount --pid --fork --kill-child \\
        sh -c 'hostname host0 && mount -t tmpfs tmpfs /dev/shm && exec "$@"' sh \\
        torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr 127.0.0.1 \\
        --master-port 29500 -m cp_infer generate --tp 2 --cp 2 ...
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cp_infer.distributed import free_port

__all__ = ["EmulatedHosts", "HostRun", "host_command", "namespaces_unavailable"]

# the host's own /dev/shm, then the launcher as the host's first process
_HOST_INIT = 'hostname "$HOST" && mount -t tmpfs tmpfs /dev/shm && exec "$@"'


def namespaces_unavailable() -> str | None:
    """Why hosts cannot be emulated here (None: they can)."""
    if sys.platform != "linux":
        return f"Linux namespaces are needed, this is {sys.platform}"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--uts", "--mount", "--pid", "--fork", "sh", "-c", _HOST_INIT, "sh", "true"],
        capture_output=True, text=True, env={**os.environ, "HOST": "probe"}, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot create UTS/mount/PID namespaces here: {probe.stderr.strip()[-300:]}"
    return None


def host_command(
    node_rank: int, *, hosts: int, nproc: int, port: int, target: list[str]
) -> list[str]:
    """The command that runs emulated host ``node_rank``: ``torchrun --nnodes HOSTS
    --node-rank N --nproc-per-node NPROC --master-addr 127.0.0.1 --master-port PORT TARGET``
    inside its own namespaces (its hostname is ``host{N}``, in ``$HOST``)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(hosts),
                "--node-rank", str(node_rank), "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(port)]  # fmt: skip
    return ["unshare", "--uts", "--mount", "--pid", "--fork", "--kill-child",
            "sh", "-c", _HOST_INIT, "sh", *torchrun, *target]  # fmt: skip


@dataclass(frozen=True)
class HostRun:
    """What one emulated host's launcher did: its exit code, output, and when it exited
    (``time.monotonic()``)."""

    host: int
    returncode: int
    stdout: str
    stderr: str
    exited_at: float


class EmulatedHosts:
    """Start ``hosts`` launchers of ``nproc`` ranks each, running ``target`` (``["-m",
    "cp_infer", ...]`` or a script and its arguments); global rank ``r`` is on host ``r //
    nproc``.

    Use as a context manager: leaving it kills every host that is still running (and with it,
    every rank: each host is a PID namespace).

    Args:
        env: extra environment for every rank (``GLOO_SOCKET_IFNAME=lo`` and
            ``OMP_NUM_THREADS=1`` are set).
        cwd: the ranks' working directory.
    """

    def __init__(
        self, hosts: int, nproc: int, target: list[str], *, env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:  # fmt: skip
        if hosts < 1 or nproc < 1:
            raise ValueError(f"need hosts >= 1 and nproc >= 1, got {hosts} and {nproc}")
        self.hosts, self.nproc, self.target = hosts, nproc, target
        self.port = free_port()
        self.env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
                    **(env or {})}  # fmt: skip
        self.cwd = cwd
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> EmulatedHosts:
        for node in range(self.hosts):
            cmd = host_command(node, hosts=self.hosts, nproc=self.nproc, port=self.port,
                               target=self.target)  # fmt: skip
            self._procs.append(subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.cwd,
                env={**self.env, "HOST": f"host{node}"}, start_new_session=True,
            ))  # fmt: skip
        return self

    def wait(self, timeout: float) -> list[HostRun]:
        """Every host's run, once all have exited; kills them all after ``timeout`` seconds
        and raises ``TimeoutError`` with what they printed."""
        deadline = time.monotonic() + timeout
        exited: dict[int, float] = {}
        while len(exited) < len(self._procs):
            for i, p in enumerate(self._procs):
                if i not in exited and p.poll() is not None:
                    exited[i] = time.monotonic()
            if time.monotonic() > deadline:
                self.kill()
                outs = [p.communicate() for p in self._procs]
                tails = "\n".join(f"--- host{i} ---\n{o[-1500:]}{e[-3000:]}"
                                  for i, (o, e) in enumerate(outs))  # fmt: skip
                raise TimeoutError(f"emulated hosts still running after {timeout:.0f}s\n{tails}")
            time.sleep(0.05)
        runs = []
        for i, p in enumerate(self._procs):
            out, err = p.communicate()
            runs.append(HostRun(i, p.returncode, out, err, exited[i]))
        return runs

    def kill(self) -> None:
        """Kill every host still running (its launcher is its PID namespace's first process:
        the kernel kills the ranks with it)."""
        for p in self._procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        self.kill()
        for p in self._procs:
            p.wait(timeout=30)
