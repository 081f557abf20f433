"""The server's driver of the engine core: rank 0 leads, every other rank follows.

Rank 0 takes requests and cancellations from the API, decides, and sends every rank one step
plan per iteration (:meth:`EngineCore.iterate <cp_infer.engine.core.EngineCore.iterate>`); the
other ranks execute the plans (:meth:`EngineCore.follow
<cp_infer.engine.core.EngineCore.follow>`) until rank 0 says stop.
"""

from __future__ import annotations

from collections.abc import Callable

from cp_infer.engine.core import EngineCore
from cp_infer.engine.request import Done, Emit, Request, Step

__all__ = ["ServeLoop"]

REMOTE_POLL_S = 0.005  # how often an engine with only remote prefills looks for their return


class ServeLoop:
    """Rank 0 leads the engine; the others follow until told to stop.

    While requests run, every message is a plan; an idle rank 0 sends a heartbeat every
    ``idle_s`` so that waiting ranks never reach the process-group timeout.

    Args:
        engine: this rank's engine core.
        idle_s: the heartbeat's period.
        on_step: rank 0: told of every forward pass (the server's metrics).
        failed_alone: called when this rank failed a plan its peers did not (default: exit).
    """

    def __init__(
        self, engine: EngineCore, *, idle_s: float = 2.0,
        on_step: Callable[[Step], None] | None = None,
        failed_alone: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.engine, self.idle_s = engine, idle_s
        self.on_step, self.failed_alone = on_step, failed_alone

    def lead(
        self,
        next_requests: Callable[[float, int], list[Request] | None],
        emit: Emit,
        cancelled: Callable[[], set[int]],
        done: Done,
        waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        """Rank 0: admit what ``next_requests(wait_s, limit)`` gives (None: stop) and run.

        A span of iterations ends early when a running request was cancelled or when
        ``waiting()`` requests are queued while a slot is free, so that they are taken at once.
        """
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
                engine.spill_retained()  # (with a KV tier: what the pool keeps is not lost)
                engine.stop_followers()
                return
            engine.submit(requests, done)
            gone = cancelled() & engine.live_requests()
            if gone:
                engine.cancel(gone, done)
            engine.arrived(arrived(), emit, done)
            if engine.runnable:
                engine.iterate(emit, done, interrupt, on_step=self.on_step,
                               failed_alone=self.failed_alone)  # fmt: skip
            else:
                engine.flush()  # a prompt sent to the prefill tier, blocks freed: say so now
                if engine.idle_for() >= self.idle_s:
                    engine.heartbeat()

    def follow(self) -> None:
        """Every other rank: execute what rank 0 sends until it says stop."""
        self.engine.follow(failed_alone=self.failed_alone)
