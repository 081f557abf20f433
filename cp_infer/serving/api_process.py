"""The API process: HTTP (uvicorn + FastAPI), validation, tokenization, detokenization and
streaming, apart from the engine's ranks so that none of it shares their GIL.

Rank 0's keeper (:mod:`cp_infer.serving.supervisor`) starts it (``spawn``: a fresh interpreter)
with the settings below and one end of a control pipe (:class:`ApiControl`), in a session of its
own. It listens on a private socket for rank 0's engine, which connects once loaded
(:mod:`cp_infer.serving.ipc`), and again after every restart: the API process outlives the
engines, keeping its clients and their requests' tokens. It stops when told (a signal to the
keepers), when signalled itself (and then the engine stops too: the next ``next`` gets no
requests), or when the keeper gives up (every stream gets an error event) or is gone; it exits
non-zero when the server failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

__all__ = ["ApiControl", "ApiSettings", "keep_torch_out", "run_api"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiSettings:
    """What the API process needs to know (picklable: it crosses the spawn)."""

    host: str
    port: int
    model_name: str
    checkpoint: str | None  # a checkpoint directory (tokenizer.json) or GGUF file, if any
    vocab_size: int
    max_seq_len: int
    max_batch: int
    max_queue: int
    eos_ids: frozenset[int]
    info: dict[str, str]
    tbt_slo_s: float | None
    log_level: int
    engine_address: str  # the socket rank 0's engine connects to (abstract: no file)
    authkey: bytes  # what it proves itself with
    max_resumes: int = 2  # a request in flight at more engine deaths fails alone


class ApiControl:
    """Rank 0's keeper's handle on the API process: a spawned process and a control pipe that
    tells it of the engine's restarts, of a failure that ends the server, and of a stop."""

    def __init__(self, process, conn: Connection) -> None:
        self.process, self.conn = process, conn

    @classmethod
    def start(cls, settings: ApiSettings) -> ApiControl:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        here, there = ctx.Pipe(duplex=True)
        process = ctx.Process(target=run_api, args=(there, settings), name="cp_infer-api",
                              daemon=True)  # fmt: skip
        process.start()
        there.close()
        return cls(process, here)

    def _send(self, message: tuple) -> None:
        # the API process gone: the keeper sees it
        with contextlib.suppress(OSError, EOFError, ValueError):
            self.conn.send(message)

    def restarting(self, why: str, when: float) -> None:
        """The engine died at ``when`` (``time.time()``) and starts again: requests wait."""
        self._send(("restarting", why, when))

    def fail(self, why: str) -> None:
        """The server cannot go on: every live request ends with an error naming ``why``."""
        self._send(("failed", why))

    def stop(self, reason: str) -> None:
        """The server is stopping: live requests end with ``finish_reason: "abort"``."""
        self._send(("stop", reason))

    def alive(self) -> bool:
        return self.process.is_alive()

    def join(self) -> int:
        """Wait for the API process to exit (it was told to stop, or it did); 0 if it did so
        cleanly, 1 otherwise."""
        from cp_infer.serving.lifecycle import STOP_GRACE_S

        self.process.join(STOP_GRACE_S + 2)
        if self.process.exitcode is None:
            logger.error("the API process did not stop within %.0fs; killing it", STOP_GRACE_S)
            self.process.kill()
            self.process.join()
        if self.process.exitcode != 0:
            logger.error("the API process exited with code %s", self.process.exitcode)
        return 0 if self.process.exitcode == 0 else 1


def keep_torch_out() -> None:
    """Make ``import torch`` fail in this process, unless something loaded it already.

    The API process runs no model, but transformers (the tokenizer: its chat templates and
    special tokens, exactly as users get them from transformers) imports torch whenever it can
    find it: about 2 s of CPU and 250 MB per server start. With torch hidden, transformers
    loads its tokenizers alone, and any torch import that creeps into this process fails
    loudly instead of costing that silently."""
    import sys

    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # the import system's "no such module"
    # transformers says once that it found no PyTorch: true, and meant for model users
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _tokenizer(checkpoint: str | None):
    from cp_infer.checkpoint.formats import has_tokenizer, load_tokenizer

    if checkpoint is None or not has_tokenizer(Path(checkpoint)):
        return None
    return load_tokenizer(Path(checkpoint), transformers=True)


def run_api(control: Connection, settings: ApiSettings) -> None:
    """The API process's main: serve until stopped; exit 1 if the server failed."""
    # a session of its own: a signal to rank 0's process group (a launcher stopping the ranks)
    # is the keeper's to interpret, not an order to this process to abort
    os.setsid()
    keep_torch_out()
    import threading
    from multiprocessing.connection import Listener

    import prometheus_client
    import uvicorn

    from cp_infer.log import setup_logging
    from cp_infer.serving.api import build_app
    from cp_infer.serving.frontend import Frontend
    from cp_infer.serving.ipc import ApiLink
    from cp_infer.serving.lifecycle import STOP_GRACE_S

    setup_logging(settings.log_level, all_ranks=True)  # the server's own log, any rank's
    prometheus_client.disable_created_metrics()  # no `_created` twin of every series
    front = Frontend(
        tokenizer=_tokenizer(settings.checkpoint), model_name=settings.model_name,
        vocab_size=settings.vocab_size, max_seq_len=settings.max_seq_len,
        max_batch=settings.max_batch, max_queue=settings.max_queue, eos_ids=settings.eos_ids,
        info=settings.info, max_resumes=settings.max_resumes,
    )  # fmt: skip
    failed: list[str] = []

    def stop(reason: str, error: bool) -> None:
        if error:
            failed.append(reason)
        front.abort_all(reason, finish_reason="error" if error else "abort")
        server.should_exit = True

    listener = Listener(settings.engine_address, family="AF_UNIX", authkey=settings.authkey)
    link = ApiLink(listener, front)
    front.pool = lambda: link.stats[0]
    front.metrics.watch_chunking(lambda: link.stats[1], settings.tbt_slo_s)

    def keeper() -> None:  # rank 0's keeper's word: restarts, a failure, a stop
        try:
            while True:
                message = control.recv()
                if message[0] == "restarting":
                    front.engine_down(f"the engine is restarting: {message[1]}", message[2])
                else:
                    logger.info("the keeper says %s: %s", message[0], message[1])
                    stop(message[1], message[0] == "failed")
        except (OSError, EOFError):
            if not front.stopping.is_set():
                stop("rank 0's keeper is gone", True)

    config = uvicorn.Config(
        build_app(front), host=settings.host, port=settings.port, log_level="warning",
        lifespan="off", timeout_graceful_shutdown=int(STOP_GRACE_S),
    )  # fmt: skip
    server = make_server(config, lambda sig: front.abort_all(f"the server is stopping ({sig})"))
    link.start()
    threading.Thread(target=keeper, name="keeper-control", daemon=True).start()
    logger.info("serving %s on http://%s:%d", front.model_name, settings.host, settings.port)
    try:
        server.run()
    finally:
        front.abort_all("the server is stopping")  # no-op unless uvicorn stopped on its own
        link.close()  # the engine's next `next` finds the pipe closed: it stops
    if failed:
        logger.error("stopped: %s", failed[0])
        os._exit(1)
    os._exit(0 if server.started else 1)


def make_server(config, on_signal):
    """uvicorn's server, whose signal handler first has ``on_signal`` called (which ends the
    live requests) and which does not re-raise the signal once stopped.

    ``on_signal`` runs on the event loop, not in the handler: the handler may have interrupted
    the loop's thread inside the frontend's lock, which ``on_signal`` takes too."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for connections
            name = signal.Signals(sig).name
            try:
                asyncio.get_running_loop().call_soon_threadsafe(on_signal, name)
            except RuntimeError:  # no loop runs (not yet, or no more): nothing holds the lock
                on_signal(name)
            self.should_exit = True

    return Server(config)
