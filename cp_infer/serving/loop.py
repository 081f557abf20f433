"""The server's driver of the engine core: rank 0 leads, every other rank follows.

Rank 0 decides what runs: before each span of iterations it sends every rank the same
:class:`~cp_infer.engine.core.Orders` (requests to admit, requests whose client left, its
timing estimates), and every rank runs the same :meth:`EngineCore.run_span`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

from cp_infer.engine.core import Done, Emit, EngineCore, Orders, Request

__all__ = ["ServeLoop"]


class ServeLoop:
    """Rank 0 sends every rank its orders; the others follow until told to stop.

    Messages go over the default group by ``broadcast_object_list``, once per span of
    :data:`~cp_infer.engine.core.SPAN` iterations while requests run. An idle rank 0 sends a heartbeat every
    ``idle_s`` so that waiting ranks never reach the process-group timeout.
    """

    def __init__(self, engine: EngineCore, *, idle_s: float = 2.0) -> None:
        self.engine, self.idle_s = engine, idle_s

    @staticmethod
    def _send(message) -> object:
        box = [message]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def lead(
        self,
        next_requests: Callable[[float, int], list[Request] | None],
        emit: Emit,
        cancelled: Callable[[], set[int]],
        done: Done,
        waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        """Rank 0: admit what ``next_requests(wait_s, limit)`` gives (None: stop) and run.

        A span ends early when a running request was cancelled or when ``waiting()`` requests
        are queued while a slot is free, so that the next orders go out at once."""
        engine = self.engine

        def interrupt() -> bool:
            return bool(cancelled() & engine.live_requests()) or (
                engine.room > 0 and waiting() > 0)  # fmt: skip

        while True:
            busy = engine.busy
            requests = next_requests(0.0 if busy else self.idle_s, engine.room)
            if requests is None:
                self._send(("stop", None))
                return
            if not requests and not busy:
                self._send(("idle", None))
                continue
            orders = Orders(
                requests=tuple(requests),
                cancelled=frozenset(cancelled() & engine.live_requests()),
                estimates=engine.timer.estimates,
            )
            self._send(("span", orders))
            engine.run_span(orders, emit, done, interrupt)

    def follow(self) -> None:
        """Every other rank: run what rank 0 sends until it says stop."""
        while True:
            kind, orders = self._send(None)
            if kind == "stop":
                return
            if kind == "span":
                self.engine.run_span(orders)
