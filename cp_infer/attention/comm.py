"""Ring communication for context parallelism: one SendRecv per step, and the All2All.

:class:`RingComm` posts the next exchange before the caller computes on the shard it holds, and
waits after, so communication overlaps attention (ring-flash-attention's pattern)::

    step s:   post send(cur -> next), recv(nxt <- prev)
              compute on cur                  # overlaps the transfer
              wait; cur, nxt = nxt, cur

It also counts what it moves (:class:`CommStats`), so tests can check the paper's claims
(N-1 SendRecv steps for pass-KV; one All2All for pass-Q) and benchmarks can report the time
spent blocked on communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel_state.layout import ring_neighbours

__all__ = ["CommStats", "RingComm"]


@dataclass
class CommStats:
    """What one ring attention call moved, and how long it waited for it."""

    sendrecv_steps: int = 0
    sendrecv_bytes: int = 0
    sendrecv_wait_s: float = 0.0  # blocked on SendRecv after the overlapped compute
    all2all_calls: int = 0
    all2all_bytes: int = 0
    all2all_s: float = 0.0  # the All2All blocks: it is on the critical path

    @property
    def exposed_s(self) -> float:
        """Communication time not hidden behind compute."""
        return self.sendrecv_wait_s + self.all2all_s


def _wire(t: torch.Tensor) -> torch.Tensor:
    """float8 goes through gloo point-to-point, but not through collectives: send bytes."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t


class RingComm:
    """Point-to-point ring and All2All over one CP process group.

    Args:
        group: the CP group; ``None`` means the default group, or a single rank when
            torch.distributed is not initialized.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)
            ranks = dist.get_process_group_ranks(group) if group is not None else None
            ranks = ranks or list(range(self.size))
            self.prev_rank, self.next_rank = ring_neighbours(ranks, self.rank)
        else:
            if group is not None:
                raise ValueError(
                    "a process group was given but torch.distributed is not initialized"
                )
            self.rank, self.size = 0, 1
            self.prev_rank = self.next_rank = 0
        self.stats = CommStats()
        self._pending: list[dist.Work] = []

    @classmethod
    def alone(cls) -> RingComm:
        """A ring of this rank only, whatever group it is in: the attention of a batch placed
        on one rank (nothing travels)."""
        comm = cls.__new__(cls)
        comm.group, comm.rank, comm.size = None, 0, 1
        comm.prev_rank = comm.next_rank = 0
        comm.stats = CommStats()
        comm._pending = []
        return comm

    def send_recv(self, send, recv=None):
        """Post ``send`` to the next rank and a receive from the previous one; don't wait.

        Args:
            send: a tensor, or a list of tensors that travel together (one step).
            recv: buffers of the same shapes to receive into; allocated when None. Never the
                caller's input tensors: they are overwritten.

        Returns:
            The buffer(s) the receive lands in, shaped like ``send`` (valid after :meth:`wait`).
        """
        assert not self._pending, "wait() for the previous exchange first"
        single = isinstance(send, torch.Tensor)
        sends = [send] if single else list(send)
        if recv is None:
            recvs = [torch.empty_like(t) for t in sends]
        else:
            recvs = [recv] if single else list(recv)
        assert all(t.is_contiguous() for t in sends)
        ops = [dist.P2POp(dist.isend, _wire(t), self.next_rank, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, _wire(t), self.prev_rank, self.group) for t in recvs]
        self._pending = dist.batch_isend_irecv(ops)
        self.stats.sendrecv_steps += 1
        self.stats.sendrecv_bytes += sum(t.numel() * t.element_size() for t in sends)
        return recvs[0] if single else recvs

    def wait(self) -> None:
        """Block until the posted exchange is done (time spent here is exposed communication)."""
        t0 = time.perf_counter()
        for work in self._pending:
            work.wait()
        self._pending = []
        self.stats.sendrecv_wait_s += time.perf_counter() - t0

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """Blocking All2All of equal slices along dim 0 (slice r goes to CP rank r)."""
        assert send.shape[0] % self.size == 0 and send.is_contiguous()
        recv = torch.empty_like(send)
        t0 = time.perf_counter()
        if self.size == 1:
            recv.copy_(send)
        else:
            dist.all_to_all_single(_wire(recv), _wire(send), group=self.group)
        self.stats.all2all_s += time.perf_counter() - t0
        self.stats.all2all_calls += 1
        self.stats.all2all_bytes += send.numel() * send.element_size()
        return recv
