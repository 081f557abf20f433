"""The server's driver of the engine core: rank 0 leads, every other rank follows.

Rank 0 decides what runs: before each span of iterations it sends every rank the same
:class:`~cp_infer.engine.core.Orders` (requests to admit, requests whose client left, its
timing estimates), and every rank runs the same :meth:`EngineCore.run_span`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch.distributed as dist

from cp_infer.engine.core import Done, Emit, EngineCore, Orders, Request

__all__ = ["ServeLoop"]

REMOTE_POLL_S = 0.005  # how often an engine with only remote prefills looks for their return


class ServeLoop:
    """Rank 0 sends every rank its orders; the others follow until told to stop.

    Messages go over the default group by ``broadcast_object_list``, once per span of
    :data:`~cp_infer.engine.core.SPAN` iterations while requests run. An idle rank 0 sends a heartbeat every
    ``idle_s`` so that waiting ranks never reach the process-group timeout.
    """

    def __init__(self, engine: EngineCore, *, idle_s: float = 2.0) -> None:
        self.engine, self.idle_s = engine, idle_s
        self._sent = time.monotonic()

    def _send(self, message) -> object:
        self._sent = time.monotonic()
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

        def arrived() -> tuple[int, ...]:  # back from a prefill tier (disaggregated serving)
            return tuple(engine.connector.arrived()) if engine.connector is not None else ()

        def interrupt() -> bool:
            return bool(cancelled() & engine.live_requests()) or (
                engine.room > 0 and waiting() > 0) or bool(arrived())  # fmt: skip

        while True:
            busy = engine.busy
            # only prompts away at the prefill tier: look again soon, without spinning
            wait_s = 0.0 if engine.runnable else (REMOTE_POLL_S if busy else self.idle_s)
            requests = next_requests(wait_s, engine.room)
            if requests is None:
                self._send(("stop", None))
                return
            back = arrived()
            if not requests and not back and not engine.runnable:
                if not busy or time.monotonic() - self._sent >= self.idle_s:
                    self._send(("idle", None))  # the followers' heartbeat
                continue
            orders = Orders(
                requests=tuple(requests),
                cancelled=frozenset(cancelled() & engine.live_requests()),
                estimates=engine.timer.estimates,
                arrived=back,
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
