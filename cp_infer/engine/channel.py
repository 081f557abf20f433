"""The engine group's control channel: the leader's plans out, followers' failures back.

The leader (rank 0 of the engine's process group) sends one message per iteration, a
:class:`~cp_infer.engine.plan.StepPlan`, and otherwise only a heartbeat while idle and the
run's end (:class:`~cp_infer.engine.plan.Control`). A message is pickled once. On one host it
goes through shared memory (:class:`~cp_infer.collectives.ShmBroadcast`: tens of microseconds,
no system call); across hosts, or when it is larger than the segment, by one broadcast over
the group (``broadcast_object_list``). Followers
send nothing back while all is well: tokens come back through the pipeline's own exchange, and a
follower that fails a plan says so in the group's store (:meth:`PlanChannel.report`), where
the leader looks only when it failed the same plan (:meth:`PlanChannel.reports`).
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections import Counter

import torch.distributed as dist

from cp_infer.collectives import ShmBroadcast, one_host

__all__ = ["PlanChannel"]

_FAILED_KEY = "cp_infer/plan_failed/{leader}/{rank}"  # per engine group (by its leader)


class PlanChannel:
    """One engine group's control messages (every rank holds one).

    Args:
        group: the engine's process group (default: the default group).
        transport: ``"auto"`` (shared memory when every rank is on this host), ``"shm"`` or
            ``"broadcast"``.
        timeout_s: how long a follower waits for a message in shared memory (the leader sends
            a heartbeat while idle), and the leader for its followers to read one.

    Attributes:
        counts: messages sent (the leader) or received (a follower) by kind: ``"plan"`` (an
            iteration's, with forward passes), ``"ops"`` (changes to the books alone, sent
            between iterations), ``"idle"``, ``"stop"``, ``"error"``.
    """

    def __init__(self, group=None, *, transport: str = "auto", timeout_s: float = 60.0) -> None:
        if transport not in ("auto", "shm", "broadcast"):
            raise ValueError(f"unknown plan transport {transport!r}: auto, shm or broadcast")
        self.group = group
        ready = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if ready else 0
        self.world = dist.get_world_size(group) if ready else 1
        self.shm: ShmBroadcast | None = None
        if self.world > 1 and transport != "broadcast" and (transport == "shm" or one_host(group)):
            self.shm = ShmBroadcast(group, timeout_s=timeout_s)
        self.counts: Counter[str] = Counter()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, message) -> None:
        """The leader: ``message`` to every follower."""
        assert self.leader, "only the leader sends"
        self.counts[_kind(message)] += 1
        if self.world == 1:
            return
        if self.shm is not None and self.shm.send(pickle.dumps(message, protocol=5)):
            return
        dist.broadcast_object_list([message], src=self._src(), group=self.group)

    def recv(self):
        """A follower: the leader's next message (waits up to the group's timeout)."""
        data = self.shm.recv() if self.shm is not None else None
        if data is not None:
            message = pickle.loads(data)
        else:  # across hosts, or too large for the segment
            box = [None]
            dist.broadcast_object_list(box, src=self._src(), group=self.group)
            message = box[0]
        self.counts[_kind(message)] += 1
        return message

    def _src(self) -> int:
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def _key(self, rank: int) -> str:
        return _FAILED_KEY.format(leader=self._src() if self.world > 1 else 0, rank=rank)

    # -- failures -----------------------------------------------------------------------------
    def report(self, n: int, message: str) -> None:
        """A follower failed plan ``n``: say so where the leader can look (best effort)."""
        store = _store()
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(self._key(self.rank), f"{n}\n{message}")

    def reports(self, n: int, timeout_s: float) -> list[str] | None:
        """The leader failed plan ``n``: every follower's message if each reported failing it
        within ``timeout_s``, else None (some follower did not fail it: the group is out of
        step)."""
        store = _store()
        if self.world == 1:
            return []
        if store is None:
            return None
        deadline = time.monotonic() + timeout_s
        found: dict[int, str] = {}
        while True:
            for rank in range(1, self.world):
                if rank in found:
                    continue
                key = self._key(rank)
                with contextlib.suppress(Exception):
                    if store.check([key]):
                        plan, message = store.get(key).decode().split("\n", 1)
                        if int(plan) == n:
                            found[rank] = message
            if len(found) == self.world - 1:
                return [found[r] for r in sorted(found)]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)


def _kind(message) -> str:
    passes = getattr(message, "passes", None)
    if passes is not None:
        return "plan" if passes else "ops"
    return message.kind


def _store():
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()
