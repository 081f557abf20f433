"""The channel between the API process and the engine's rank 0.

HTTP, validation, tokenization, detokenization and streaming run in an API process of their own
(:mod:`cp_infer.serving.api_process`); the engine's ranks run only iterations. Rank 0's engine
connects to the API process's socket once loaded (again after each restart); over that duplex
connection, each end read by one thread only:

- engine -> API: ``("next", wait_s, limit, stats, steps)`` asks for requests;
  ``("tokens", [(rid, token, logprob)], steps)`` carries a step's sampled tokens;
  ``("done", requests, outcomes)`` ends requests. ``steps`` are the forward passes since the
  last message (metrics).
- API -> engine: ``("batch", requests | None)`` answers ``next`` (None: stop);
  ``("state", cancelled, queued)`` whenever a request is queued or cancelled.

:class:`EngineLink` is the engine's end: it gives :meth:`ServeLoop.lead
<cp_infer.serving.loop.ServeLoop.lead>` the same callables the in-process
:class:`~cp_infer.serving.frontend.Frontend` gave it. :class:`ApiLink` is the API's end: a
thread that takes each engine's connection and answers it from the frontend. A closed
connection: the API process gone stops the engine; the engine gone leaves the requests waiting
for the next one (:meth:`Frontend.engine_down <cp_infer.serving.frontend.Frontend.engine_down>`)
until rank 0's keeper says whether it restarts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from cp_infer.engine.chunking import Estimates
from cp_infer.engine.request import Outcome, PoolStats, Request, Step

__all__ = ["ApiLink", "EngineLink", "EngineStats"]

logger = logging.getLogger(__name__)

#: (the KV pool and prefix reuse, the chunk sizing's estimates): the engine's state that
#: ``/metrics`` shows and the API checks requests against, sent with every ``next``.
EngineStats = tuple[PoolStats, Estimates]


class EngineLink:
    """The engine's end of the pipe, on rank 0: what the engine loop calls.

    Only the engine thread reads the pipe; any thread may send (a signal handler's ``stop``, the
    watchdog's ``failed``).

    Args:
        conn: this end of the pipe.
        stats: the engine's state for the API's metrics, read at every ``next``.
    """

    def __init__(self, conn: Connection, stats: Callable[[], EngineStats]) -> None:
        self.conn, self.stats = conn, stats
        self._send_lock = threading.Lock()
        self._cancelled: frozenset[int] = frozenset()
        self._queued = 0
        self._steps: list[Step] = []  # forward passes not yet told (metrics)
        self.closed = False  # the API process is gone

    # -- sending (any thread) --------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        if self.closed:
            return
        with self._send_lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError, ValueError):  # the API process is gone
                self.closed = True

    def emit(self, events: list[tuple]) -> None:
        """A step's sampled tokens, (rid, token, logprob) each, in one message (with the steps
        that ran since the last message, for the metrics)."""
        self._send(("tokens", events, self._untold_steps()))

    def done(self, requests: list[Request], outcomes: dict[int, Outcome]) -> None:
        self._send(("done", requests, outcomes))

    def step(self, step: Step) -> None:
        """Kept for the next message: one wake-up of the API process per step, not two."""
        self._steps.append(step)

    def _untold_steps(self) -> list[Step]:
        steps, self._steps = self._steps, []
        return steps

    # -- receiving (the engine thread only) -------------------------------------------------------
    def _take(self, message: tuple):
        kind = message[0]
        if kind == "state":
            self._cancelled, self._queued = message[1], message[2]
            return None
        return message

    def _poll(self) -> None:
        """Read what the API sent so far, without waiting."""
        try:
            while not self.closed and self.conn.poll(0):
                self._take(self.conn.recv())
        except (OSError, EOFError):
            self.closed = True

    def next_batch(self, wait_s: float, limit: int | None = None) -> list[Request] | None:
        """Up to ``limit`` queued requests, the API waiting up to ``wait_s`` for the first
        ([] if none came; None: stop, or the API process is gone)."""
        self._send(("next", wait_s, limit, self.stats(), self._untold_steps()))
        try:
            while not self.closed:
                message = self._take(self.conn.recv())
                if message is not None and message[0] == "batch":
                    return message[1]
        except (OSError, EOFError):
            self.closed = True
        logger.warning("the API process is gone: stopping")
        return None

    def cancelled(self) -> set[int]:
        self._poll()
        return set(self._cancelled)

    @property
    def queued(self) -> int:
        self._poll()
        return self._queued


class ApiLink:
    """The API's end: a thread that takes each engine's connection in turn, answers it from the
    frontend and hands it the engine's tokens and outcomes.

    Args:
        listener: where rank 0's engine connects (after every restart, again).
        front: the API process's frontend (queue, live requests, metrics).
    """

    def __init__(self, listener, front) -> None:
        self.listener, self.front = listener, front
        self.conn: Connection | None = None
        self._send_lock = threading.Lock()
        self.stats: EngineStats = (PoolStats(), Estimates())
        self._thread = threading.Thread(target=self._run, name="engine-link", daemon=True)
        front.on_change = self.push_state

    def start(self) -> ApiLink:
        self._thread.start()
        return self

    def close(self) -> None:
        """No more engines: the connected one's next ``next`` finds the connection closed."""
        with contextlib.suppress(OSError):
            self.listener.close()
        if self.conn is not None:
            self.conn.close()

    def _send(self, message: tuple) -> None:
        conn = self.conn  # none between engines: the next one gets the state when it asks
        if conn is None:
            return
        # the engine gone: _serve sees it
        with self._send_lock, contextlib.suppress(OSError, EOFError, ValueError):
            conn.send(message)

    def push_state(self) -> None:
        """Tell the engine which requests were cancelled and how many wait (any thread)."""
        self._send(("state", frozenset(self.front.cancelled()), self.front.queued))

    def _run(self) -> None:
        front = self.front
        while not front.stopping.is_set():
            try:
                conn = self.listener.accept()
            except (OSError, EOFError):  # closed: the server stops
                return
            except Exception as e:  # a stranger that failed the handshake: not an engine
                logger.warning("refused a connection to the engine socket: %s", e)
                continue
            resumed = front.engine_up()
            if resumed:
                logger.info("the engine is back: %d requests in flight resume", resumed)
            self.conn = conn
            self._serve(conn)
            self.conn = None
            if not front.stopping.is_set():
                front.engine_down("the engine stopped; its keeper decides whether it restarts")

    def _serve(self, conn: Connection) -> None:
        front = self.front
        try:
            while True:
                message = conn.recv()
                kind = message[0]
                if kind == "next":
                    _, wait_s, limit, self.stats, steps = message
                    front.metrics.pool(self.stats[0])
                    for step in steps:
                        front.metrics.step(step)
                    # at most a quarter second: a stop waits behind this call
                    batch = front.next_batch(min(wait_s, 0.25), limit)
                    self._send(("batch", batch))
                    self.push_state()
                elif kind == "tokens":
                    front.emit(message[1])
                    for step in message[2]:
                        front.metrics.step(step)
                elif kind == "done":
                    front.done(message[1], message[2])
                    self.push_state()
        except (OSError, EOFError):
            pass
