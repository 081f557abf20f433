"""Each rank's keeper: the process the launcher started, which runs the rank's engine in a child
process and starts every rank's engine again when any one dies.

::

    launcher (torchrun, deepspeed)
      └─ keeper, rank r        no model, no collectives: watches its engine, the peers, the store
           ├─ engine, rank r   forked per generation: the model, the KV cache, the process groups
           └─ API process      rank 0 only: HTTP, every request and the tokens it got so far

A death is anything that ends an engine without a stop: kill -9, an exception outside the
engine's containment, a broken collective, a watchdog that found a peer gone. The keeper that sees
it posts it in the launcher's rendezvous store (``gen{g}/failed``); every keeper then kills its
engine (SIGKILL: its state is lost with the dead rank's anyway) and, if the restart policy
allows, forks generation ``g + 1`` with the same layout, checkpoint and options. The engines of a
generation meet in a process group of their own (the store's keys under ``gen{g}/``). The API
process outlives them all: rank 0's new engine connects to it, and it resubmits every request
in flight as its prompt plus the tokens it delivered (:meth:`Frontend.resume
<cp_infer.serving.frontend.Frontend.resume>`).

Forking from a keeper that has imported torch, megatron-core and the engine but run nothing
(no thread pool, no CUDA, no process group) spares each restart the imports: a restart costs
the weights' load and the process groups' set-up (see docs/performance.md).

What ends the server instead (every client gets an error, every process exits non-zero): more
deaths than ``--max-restarts`` within ``--restart-window`` seconds; a death of the first
generation before it served (a bad checkpoint fails the same way every time); a keeper gone
(its host, or the launcher, died); the API process gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["EngineGeneration", "Keeper", "RestartPolicy"]

logger = logging.getLogger("cp_infer")

PREFIX = "cp_infer/keeper/"
POLL_S = 0.1  # how often a keeper looks at the store (its own engine's death wakes it at once)
BEAT_S = 0.5  # keepers' heartbeats
KEEPER_DEAD_S = 15.0  # a keeper whose beats stand still this long is gone (its host with it)
SETTLE_S = 0.3  # after a death, how long the keepers wait for every rank's report of it


@dataclass(frozen=True)
class RestartPolicy:
    """``serve --max-restarts N --restart-window S``: the engine starts again after a death
    unless that makes more than ``max_restarts`` deaths within ``window_s`` seconds."""

    max_restarts: int = 3
    window_s: float = 600.0

    def allows(self, deaths: list[float]) -> bool:
        """Whether the engine may start again after ``deaths`` (their times; the last is now's).
        Pure: every keeper reads the same times from the store and decides alike."""
        last = deaths[-1]
        return sum(1 for t in deaths if last - t <= self.window_s) <= self.max_restarts


@dataclass(frozen=True)
class EngineGeneration:
    """What a forked engine knows of its keeper: its generation and the keepers' store."""

    gen: int
    addr: str
    port: int
    started: float  # time.time() at its fork

    def store(self, timeout_s: float):
        """This generation's store: its default process group meets under ``gen{g}/``."""
        import torch.distributed as dist

        base = dist.TCPStore(self.addr, self.port, is_master=False,
                             timeout=timedelta(seconds=timeout_s))  # fmt: skip
        return dist.PrefixStore(f"{PREFIX}gen{self.gen}/pg/", base)

    def mark_ready(self) -> None:
        """This rank's engine has loaded and joined its peers: the generation serves."""
        import torch.distributed as dist

        store = dist.TCPStore(self.addr, self.port, is_master=False,
                              timeout=timedelta(seconds=30))  # fmt: skip
        store.add(f"{PREFIX}gen{self.gen}/ready", 1)


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Keeper:
    """One rank's keeper (see the module's docstring).

    Args:
        rank, world: this rank and the world size.
        policy: when the engines may start again.
        engine_main: what a forked engine runs: ``engine_main(generation) -> exit code`` (0:
            the server stopped on orders; anything else is a death).
        api: rank 0: the API process's control, told of restarts, failures and stops
            (:class:`ApiControl`); None on other ranks.
        watch_parent: the launcher is this process's parent: its death stops everything.
    """

    def __init__(
        self, *, rank: int, world: int, policy: RestartPolicy,
        engine_main: Callable[[EngineGeneration], int], api=None, watch_parent: bool = True,
        timeout_s: float = 300.0,
    ) -> None:  # fmt: skip
        import torch.distributed as dist

        self.rank, self.world, self.policy = rank, world, policy
        self.engine_main, self.api = engine_main, api
        self.parent = os.getppid() if watch_parent else None
        self.addr, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        # torchrun's agent hosts the store; under another launcher rank 0's keeper does (it
        # outlives the engines, which used to host it)
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
        self.store = dist.TCPStore(
            self.addr, self.port, is_master=rank == 0 and not agent,
            timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
        )  # fmt: skip
        if rank == 0 and not agent:
            self.port = self.store.port
        self.store.set(f"{PREFIX}where/{rank}", f"{socket.gethostname()} {os.getpid()}")
        self.signals: list[int] = []
        self.deaths: list[float] = []
        self._seen = {r: (-1, time.monotonic()) for r in range(world) if r != rank}
        self._beat_at = 0.0

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Run engines until the server stops; the exit code of this rank's launched process."""
        for sig in (signal.SIGINT, signal.SIGTERM):  # noted; the loop acts on them
            signal.signal(sig, lambda sig, _frame: self.signals.append(sig))
        gen, engine = 0, self._fork(0)
        while True:
            started = time.time()
            end = self._watch(engine, gen)
            if end is not None:
                return end
            first = json.loads(self.store.get(f"{PREFIX}gen{gen}/failed"))
            when = float(first["time"])
            self.deaths.append(when)
            if gen == 0 and not self._ready(0):
                # it never served: a bad checkpoint or option fails alike every time
                why = self._cause(gen, first["rank"])
                return self._give_up(f"{why} before the server was ready (not restarted)")
            if not self.policy.allows(self.deaths):
                return self._give_up(
                    f"{self._cause(gen, first['rank'])}; that is {len(self.deaths)} deaths, more than "
                    f"--max-restarts {self.policy.max_restarts} within "
                    f"{self.policy.window_s:.0f}s"
                )
            engine = self._fork(gen + 1)  # what died is read while the next one loads
            why = self._cause(gen, first["rank"])
            n = sum(1 for t in self.deaths if when - t <= self.policy.window_s)
            logger.error("the engine died: %s (served %.1fs); restarting (%d of at most %d)",
                         why, when - started, n, self.policy.max_restarts)  # fmt: skip
            if self.api is not None:
                self.api.restarting(why, when)
            gen += 1

    def _fork(self, gen: int):
        ctx = multiprocessing.get_context("fork")
        g = EngineGeneration(gen, self.addr, self.port, time.time())
        engine = ctx.Process(target=_engine, args=(self.engine_main, g), name=f"engine-{gen}",
                             daemon=False)  # fmt: skip
        engine.start()
        logger.debug("rank %d: engine generation %d is pid %d", self.rank, gen, engine.pid)
        return engine

    def _watch(self, engine, gen: int) -> int | None:
        """Until this generation ends: None when it died (the keepers restart it), or this
        process's exit code when the server stopped."""
        failed = f"{PREFIX}gen{gen}/failed"
        ready = False
        while True:
            engine.join(POLL_S)
            if self.signals:  # a launcher also stops the ranks when one of them died
                dead = self._dead_keeper()
                if dead is not None:
                    return self._abandon(engine, dead)
                return self._stop(engine, f"the server is stopping "
                                          f"({signal.Signals(self.signals[0]).name})")  # fmt: skip
            if self.parent is not None and os.getppid() != self.parent:
                return self._abandon(engine, f"the launcher (pid {self.parent}) is gone")
            if self.api is not None and not self.api.alive():  # stopped by a signal, or died
                clean = self.api.process.exitcode == 0
                return self._stop(engine, "the API process stopped" if clean else
                                  "the API process is gone", code=0 if clean else 1)  # fmt: skip
            code = engine.exitcode
            if code == 0:  # stopped on orders: rank 0's engine told every rank
                return self._finish(0)
            if code is not None:
                self._report(gen, f"rank {self.rank}'s engine (pid {engine.pid}) "
                                  f"{_describe(code)}")  # fmt: skip
            try:
                if self.store.check([f"{PREFIX}stop"]):
                    return self._stop(engine, "rank 0 is stopping")
                if self.store.check([failed]):
                    _kill(engine)
                    return None
                if not ready and self.api is not None and gen > 0 and self._ready(gen):
                    ready = True
                    logger.info("the engine serves again: %.1fs after the death",
                                time.time() - self.deaths[-1])  # fmt: skip
                lost = self._beat()
            except Exception as e:  # the store lives in the launcher (or rank 0's keeper)
                lost = (f"lost the rendezvous store ({type(e).__name__}): the launcher that "
                        "hosts it (or rank 0's keeper, under another launcher) is gone")  # fmt: skip
            if lost is not None:
                return self._abandon(engine, lost)

    def _report(self, gen: int, why: str) -> None:
        """Post this rank's death: the first report's time decides the restart policy."""
        key = f"{PREFIX}gen{gen}/failed"
        self.store.compare_set(key, "", json.dumps({"time": time.time(), "rank": self.rank}))
        self.store.set(f"{PREFIX}gen{gen}/died/{self.rank}", why)

    def _cause(self, gen: int, first: int) -> str:
        """What died: the ranks' reports, a rank killed by a signal before one whose collective
        broke because of it (``first``: the rank that reported first)."""
        time.sleep(SETTLE_S)  # the dead rank's keeper may report a moment after its peers
        reports = []
        for r in range(self.world):
            key = f"{PREFIX}gen{gen}/died/{r}"
            if self.store.check([key]):
                reports.append(self.store.get(key).decode())
        signalled = [w for w in reports if "killed by" in w]
        return (signalled or reports or [f"rank {first}'s engine failed"])[0]

    def _ready(self, gen: int) -> bool:
        key = f"{PREFIX}gen{gen}/ready"
        return self.store.check([key]) and self.store.add(key, 0) >= self.world

    def _dead_keeper(self) -> str | None:
        """A keeper on this host whose process is gone (killed: the launcher then stops the
        others, which must not take that for an orderly stop)."""
        from cp_infer.serving.lifecycle import process_running

        host = socket.gethostname()
        for r in range(self.world):
            key = f"{PREFIX}where/{r}"
            try:
                where, pid = self.store.get(key).decode().rsplit(" ", 1) if (
                    r != self.rank and self.store.check([key])) else ("", "0")  # fmt: skip
            except Exception:  # the store is gone with its host
                return None
            if where == host and not process_running(int(pid)):
                with contextlib.suppress(Exception):
                    if self.store.check([f"{PREFIX}left/{r}"]):
                        continue  # it stopped too, in order
                return f"rank {r}'s keeper (pid {pid}) died"
        return None

    def _beat(self) -> str | None:
        """Beat for this keeper and look for one whose beats stopped (its host is gone)."""
        now = time.monotonic()
        if now - self._beat_at < BEAT_S:
            return None
        self._beat_at = now
        self.store.add(f"{PREFIX}beat/{self.rank}", 1)
        for r, (last, since) in self._seen.items():
            count = self.store.add(f"{PREFIX}beat/{r}", 0)
            if count != last:
                self._seen[r] = (count, now)
            elif now - since > KEEPER_DEAD_S:
                return f"rank {r}'s keeper stopped responding for {KEEPER_DEAD_S:.0f}s"
        return None

    # -- endings ---------------------------------------------------------------------------------
    def _stop(self, engine, reason: str, code: int = 0) -> int:
        """An orderly stop: rank 0 ends the live requests and its engine tells the others."""
        logger.info("%s", reason)
        if self.api is not None:  # the keeper with the API leads the stop
            with contextlib.suppress(Exception):
                self.store.set(f"{PREFIX}stop", reason)
            self.api.stop(reason)
        from cp_infer.serving.lifecycle import STOP_GRACE_S

        engine.join(STOP_GRACE_S + 1)
        if engine.exitcode is None:
            _kill(engine)
        return self._finish(code)

    def _abandon(self, engine, why: str) -> int:
        """Something no restart mends: end everything now, non-zero."""
        _kill(engine)
        return self._give_up(why)

    def _give_up(self, why: str) -> int:
        logger.error("stopped: %s", why)
        if self.api is not None:
            self.api.fail(why)
        return self._finish(1)

    def _finish(self, code: int) -> int:
        with contextlib.suppress(Exception):  # an orderly exit: not a death (_dead_keeper)
            self.store.set(f"{PREFIX}left/{self.rank}", str(code))
        if self.api is not None:
            code = max(code, self.api.join())
        return code


def _kill(engine) -> None:
    if engine.exitcode is None:
        engine.kill()
    engine.join()


def _engine(main: Callable[[EngineGeneration], int], g: EngineGeneration) -> None:
    """A forked engine's body: its own signal handling, then ``main``; exits with its code at
    once (an interpreter's shutdown joins threads a process group may hold for seconds, and
    nothing of an engine needs it: its shared memory is unlinked as soon as it is mapped)."""
    from cp_infer.distributed import exit_now

    # a launcher's signal reaches the engine too (torchrun signals each rank's process group):
    # the keeper stops it in order (rank 0's engine tells the others, a KV tier takes what the
    # pool keeps), and kills it if it is not gone within STOP_GRACE_S
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    exit_now(main(g))
