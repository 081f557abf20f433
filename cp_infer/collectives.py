"""Small, latency-bound collectives of decode: one exchange per layer, chosen by measurement.

A decode step moves a few KiB per layer: KVP's (output, LSE) partials over the CP group and
the TP all-reduce of the projections. At that size the cost is latency, not bandwidth, so the
transport matters more than the algorithm. :func:`make_exchange` builds one of:

- ``"collective"``: the process group's own ``all_gather`` (gloo, or NCCL on CUDA).
- ``"sendrecv"``: one batched SendRecv with every peer (at cp=2, one exchange).
- ``"shm"``: a shared-memory all-gather among ranks of one host. Each rank writes its tensor
  into its own slot of one mapped segment and raises a sequence number; peers spin on the
  number and copy the slot out. No system call and no helper thread on the critical path,
  the same idea as DeepSpeed's CPU ``inference_all_reduce`` and the direct-access all-reduce of
  Meta's inference post (both are all-reduces over the world; this is an all-gather over any
  group of one host, which is what an exact LSE merge needs).

``"auto"`` takes ``"shm"`` for CPU tensors when every rank of the group is on this host and
the CPU orders stores (x86-64), else ``"collective"``. ``tools/bench_collectives.py`` measures
all of them (and DeepSpeed's shared-memory all-reduce) on the decode shapes.

Every exchange is exact (bytes are copied, never reduced) and returns the tensors of all ranks
of the group in group-rank order.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
import uuid
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from cp_infer.distributed import peer_failure

__all__ = [
    "EXCHANGES", "AllReduce", "Exchange", "ShmBroadcast", "make_all_reduce", "make_exchange",
    "one_host",
]  # fmt: skip

logger = logging.getLogger(__name__)

EXCHANGES = ("auto", "collective", "sendrecv", "shm")


class Exchange(Protocol):
    """All-gather of one fixed-shape tensor per rank (the same shape and dtype on every rank)."""

    size: int

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]: ...


class CollectiveExchange:
    """The process group's own all_gather."""

    def __init__(self, group) -> None:
        self.group, self.size = group, dist.get_world_size(group)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts


class SendRecvExchange:
    """Every rank sends its tensor to every peer in one batched SendRecv."""

    def __init__(self, group) -> None:
        self.group, self.size = group, dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.contiguous()
        parts = [t if r == self.rank else torch.empty_like(t) for r in range(self.size)]
        ops = []
        for r in range(self.size):
            if r != self.rank:
                ops.append(dist.P2POp(dist.isend, t, self.ranks[r], self.group))
                ops.append(dist.P2POp(dist.irecv, parts[r], self.ranks[r], self.group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return parts


_HEADER = 64  # bytes before each slot's data: the sequence number, on its own cache line
SPIN_S = 200e-6  # a wait longer than this sleeps between checks instead of spinning
#: Where the segments' files are made (and unlinked once mapped): a tmpfs.
SHM_DIR_ENV = "CP_INFER_SHM_DIR"


def _shm_dir() -> str:
    """``$CP_INFER_SHM_DIR``, else /dev/shm."""
    return os.environ.get(SHM_DIR_ENV) or "/dev/shm"


class ShmExchange:
    """All-gather through one shared-memory segment, for the ranks of one host.

    Args:
        group: the ranks that exchange (all on this host).
        max_bytes: the largest tensor :meth:`all_gather` will be given.
        timeout_s: how long to wait for a peer before raising (a peer that died never posts).

    Note:
        Each rank owns one slot per parity of the sequence number::

            segment: | r0: seq | even data | odd data | r1: seq | even data | odd data | ...

        Exchange s writes the rank's data to parity s % 2, then publishes s; a reader waits
        for every peer's number to reach s and copies the data out. A rank can run at most one
        exchange ahead of the slowest peer (it waits for all of them every time), so the other
        parity is never being read when it is overwritten. Correct on CPUs that keep stores in
        order (x86-64); :func:`make_exchange` uses it only there.
    """

    def __init__(self, group, max_bytes: int, timeout_s: float = 60.0) -> None:
        self.group, self.size = group, dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.max_bytes = -(-max_bytes // 64) * 64
        self.timeout_s = timeout_s
        self.slot = _HEADER + 2 * self.max_bytes
        buf = _shared_segment(group, self.size * self.slot)
        self._buf = buf.view(self.size, self.slot)
        self._seq_np = self._buf.numpy()[:, :8].view(np.int64)  # (size, 1), shared memory
        self._seq_np[self.rank, 0] = 0
        self.seq = 0
        dist.barrier(group=group)

    def _data(self, rank: int, parity: int, n: int) -> torch.Tensor:
        start = _HEADER + parity * self.max_bytes
        return self._buf[rank, start : start + n]

    def _wait_for(self, rank: int, seq: int) -> None:
        _wait_until(self._seq_np[rank], seq, self.timeout_s,
                    f"shared-memory exchange: group rank {rank} did not post exchange {seq}")  # fmt: skip

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.contiguous()
        raw = t.view(-1).view(torch.uint8)
        n = raw.numel()
        if n > self.max_bytes:
            raise ValueError(f"a {n}-byte tensor exceeds this exchange's {self.max_bytes} bytes")
        self.seq += 1
        parity = self.seq % 2
        self._data(self.rank, parity, n).copy_(raw)
        self._seq_np[self.rank, 0] = self.seq  # publish after the data (x86 keeps store order)
        parts = []
        for r in range(self.size):
            if r == self.rank:
                parts.append(t)
                continue
            self._wait_for(r, self.seq)
            parts.append(self._data(r, parity, n).clone().view(t.dtype).view(t.shape))
        return parts


def _wait_until(flag: np.ndarray, value: int, timeout_s: float, what: str) -> None:
    """Spin until ``flag[0]`` (shared memory) reaches ``value``: yield the core after a few
    spins, and after :data:`SPIN_S` back off to short sleeps (up to 1 ms), so that a late peer
    (one sharing a core with a server's HTTP thread, say) gets the core rather than a spinning
    rank, and an idle wait costs next to nothing."""
    spins, start, nap = 0, None, 0.0
    while flag[0] < value:  # (idle, it naps: a follower waiting for the next plan)
        spins += 1
        if spins <= 32:
            continue
        if nap or spins % 64 == 0:  # napping: check the clock at every wake-up
            now = time.monotonic()
            start = start or now
            if now - start > timeout_s:
                cause = peer_failure()
                raise TimeoutError(f"{what} in {timeout_s:.0f}s"
                                   + (f" (a rank failed: {cause})" if cause else ""))  # fmt: skip
            if now - start > SPIN_S:  # (a wait past a second is idle: 5 ms naps)
                nap = min(max(2 * nap, 20e-6), 1e-3 if now - start < 1.0 else 5e-3)
                time.sleep(nap)
                continue
        os.sched_yield()  # give the core away if a peer waits for it


def _shared_segment(group, nbytes: int) -> torch.Tensor:
    """``nbytes`` of shared memory mapped by every rank of ``group`` (a collective; the file's
    name is gone once all have mapped it)."""
    rank = dist.get_rank(group)
    leader = dist.get_process_group_ranks(group)[0] if group is not None else 0
    name = [os.path.join(_shm_dir(), f"cp_infer-{uuid.uuid4().hex}")]
    dist.broadcast_object_list(name, src=leader, group=group)
    path = name[0]
    if rank == 0:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    dist.barrier(group=group)
    try:
        return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    finally:
        dist.barrier(group=group)  # every rank has mapped it: the name can go
        if rank == 0:
            os.unlink(path)


class ShmBroadcast:
    """Byte strings from group rank 0 to the other ranks of one host, through one shared
    segment (the engine's step plans: :class:`cp_infer.engine.channel.PlanChannel`).

    Args:
        group: the ranks (all on this host).
        max_bytes: the largest message the segment carries; a larger one is announced there
            and sent by the caller's fallback (:meth:`send` returns False, :meth:`recv` None).
        timeout_s: how long a rank waits for the other side before raising.

    Note:
        Layout: one 64-byte line per rank for its numbers (rank 0: the last message it posted
        and the two slots' lengths; the others: the last message they read), then rank 0's
        two data slots, by parity::

            | r0: posted, len even, len odd | r1: read | r2: read | ... | even data | odd data |

        Rank 0 writes message s to parity s % 2 once every reader has read message s - 2,
        then posts s; a reader waits for s, copies the data out and says it read s. Correct on
        CPUs that keep stores in order (x86-64), as :class:`ShmExchange`.
    """

    def __init__(self, group, max_bytes: int = 1 << 20, timeout_s: float = 60.0) -> None:
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.max_bytes = -(-max_bytes // 64) * 64
        self.timeout_s = timeout_s
        lines = 64 * self.size
        buf = _shared_segment(group, lines + 2 * self.max_bytes)
        self._flags = buf[:lines].numpy().view(np.int64).reshape(self.size, 8)
        self._data = buf[lines:].numpy()
        self._flags[self.rank, :] = 0
        self.seq = 0
        dist.barrier(group=group)

    def send(self, data: bytes) -> bool:
        """Rank 0: post ``data``; False if it is too large for the segment (the readers were
        told so: send it by the fallback now)."""
        s = self.seq + 1
        for r in range(1, self.size):  # the slot's last message was read by everyone
            _wait_until(self._flags[r], s - 2, self.timeout_s,
                        f"plan broadcast: group rank {r} did not read message {s - 2}")  # fmt: skip
        n = len(data)
        fits = n <= self.max_bytes
        parity = s % 2
        if fits:
            start = parity * self.max_bytes
            self._data[start : start + n] = np.frombuffer(data, dtype=np.uint8)
        self._flags[0, 1 + parity] = n if fits else -1
        self._flags[0, 0] = s  # publish after the data (x86 keeps store order)
        self.seq = s
        return fits

    def recv(self) -> bytes | None:
        """Another rank: the next message (None: it comes by the fallback)."""
        s = self.seq + 1
        _wait_until(self._flags[0], s, self.timeout_s,
                    f"plan broadcast: group rank 0 did not post message {s}")  # fmt: skip
        parity = s % 2
        n = int(self._flags[0, 1 + parity])
        data = None
        if n >= 0:
            start = parity * self.max_bytes
            data = self._data[start : start + n].tobytes()
        self._flags[self.rank, 0] = s
        self.seq = s
        return data


def _shm_serves(hosts: list[str]) -> bool:
    """Whether ranks on ``hosts`` can share memory: one host, whose CPU keeps stores in order
    (x86-64), with a /dev/shm (or ``$CP_INFER_SHM_DIR``)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return len(set(hosts)) == 1 and x86 and os.path.isdir(_shm_dir())


def one_host(group) -> bool:
    """Whether every rank of ``group`` can share memory with the others (a collective)."""
    return _shm_serves(_hosts(group))


_REPORTED: set[tuple] = set()  # (group ranks, transport) already logged


def _hosts(group) -> list[str]:
    """The hostname of every rank of ``group`` (a collective)."""
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return hosts


def _report(group, kind: str, hosts: list[str]) -> None:
    """Say once per group which transport ``"auto"`` chose, and why."""
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ()
    if (ranks, kind) not in _REPORTED:
        _REPORTED.add((ranks, kind))
        where = "one host" if len(set(hosts)) == 1 else f"{len(set(hosts))} hosts"
        logger.info("exchange over ranks %s (%s): %s", list(ranks) or "all", where, kind)


def make_exchange(
    kind: str, group, *, device: torch.device, max_bytes: int, timeout_s: float = 60.0
) -> Exchange:
    """The exchange ``kind`` over ``group`` (collective: every rank of the group calls it).

    Args:
        kind: one of :data:`EXCHANGES`.
        device: where the exchanged tensors live (``"shm"`` is for CPU tensors only).
        max_bytes: the largest tensor exchanged (sizes the shared-memory segment).
        timeout_s: how long ``"shm"`` waits for a peer.
    """
    if kind not in EXCHANGES:
        raise ValueError(f"unknown exchange {kind!r}; choose one of {list(EXCHANGES)}")
    if kind == "auto":
        kind = "collective"
        # every rank of the group takes part in the host check (a collective) before any
        # rank looks at its own machine: on one host, those local answers agree
        hosts = _hosts(group) if device.type == "cpu" else []
        if hosts and _shm_serves(hosts):
            kind = "shm"
        if hosts:
            _report(group, kind, hosts)
    if kind == "shm":
        if device.type != "cpu":
            raise ValueError(f"the shm exchange moves CPU tensors, not {device.type}; use auto")
        return ShmExchange(group, max_bytes, timeout_s)
    if kind == "sendrecv":
        return SendRecvExchange(group)
    return CollectiveExchange(group)


class AllReduce:
    """Sum over a group: tensors up to ``small_bytes`` through an exchange (an all-gather, then
    a sum in group-rank order, so every rank gets the same bits), larger ones through the
    group's own all-reduce. Every rank of the group reduces tensors of the same size, so all
    of them take the same path.

    Args:
        group: the ranks that sum (a TP group).
        exchange: the small-tensor transport; None: always the group's all-reduce.
        small_bytes: the largest tensor the exchange takes.
    """

    def __init__(self, group, exchange: Exchange | None = None, small_bytes: int = 0) -> None:
        self.group, self.exchange, self.small_bytes = group, exchange, small_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.exchange is not None and x.numel() * x.element_size() <= self.small_bytes:
            parts = self.exchange.all_gather(x)
            out = parts[0].clone()
            for p in parts[1:]:
                out += p
            return out
        dist.all_reduce(x, group=self.group)
        return x


def make_all_reduce(
    kind: str, group, *, device: torch.device, small_bytes: int = 1 << 20, timeout_s: float = 60.0
) -> AllReduce:
    """The sum over ``group`` that decode-sized tensors take (``kind`` as in
    :func:`make_exchange`; ``"collective"`` and ``"sendrecv"`` mean the group's all-reduce)."""
    if kind not in EXCHANGES:
        raise ValueError(f"unknown exchange {kind!r}; choose one of {list(EXCHANGES)}")
    if kind in ("auto", "shm"):
        ex = make_exchange(kind, group, device=device, max_bytes=small_bytes, timeout_s=timeout_s)
        if isinstance(ex, ShmExchange):
            return AllReduce(group, ex, small_bytes)
    return AllReduce(group)
