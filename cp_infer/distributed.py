"""Errors that every rank agrees on, for the front doors (CLI, server) and the engine.

A rank that fails alone must not leave the others waiting in a collective it never joins. Two
mechanisms cover the two cases:

- At a check point, :func:`on_all_ranks` runs a step on every rank and shares its outcome: if
  the step raised anything on any rank, every rank raises :class:`RankFailure` with the same
  one-line message.
- Between check points (inside generation, say) a failing rank cannot reach the others, which
  are blocked in a collective. It posts its message in the process group's key-value store
  (:func:`announce_failure`) and exits; the others see their collective break as its sockets
  close, and :func:`peer_failure` tells them why, so every rank reports the same cause.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "RankFailure",
    "announce_failure",
    "clear_failure",
    "error_message",
    "exit_now",
    "free_port",
    "on_all_ranks",
    "peer_failure",
    "report_failure",
]

T = TypeVar("T")

_FAILURE_KEY = "cp_infer/failure"

#: Errors whose text is written for users (bad input, a backend missing on this machine).
_USER_ERRORS = (ValueError, ImportError, FileNotFoundError, NotADirectoryError, PermissionError)


class RankFailure(Exception):
    """A step failed on one or more ranks; ``str()`` is the message every rank reports."""


def error_message(error: BaseException) -> str:
    """One line for a user: the text of a user error, else the error's type and text."""
    if isinstance(error, (RankFailure, *_USER_ERRORS)):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split()) or type(error).__name__


def exit_now(code: int) -> None:
    """Leave the process at once (threads may be blocked in a collective with a dead rank)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world(group) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def on_all_ranks(fn: Callable[[], T], group=None) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise :class:`RankFailure` on all.

    The message is the error's own when every rank failed alike (a check on the same input),
    else ``"rank R: ..."`` naming the first rank that failed (a checkpoint tensor only one
    pipeline stage reads, say). On a rank that failed, the original error is the ``__cause__``.
    """
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:
        error = e
    mine = error_message(error) if error is not None else None
    if _world(group) == 1:
        messages = [mine]
    else:
        # one small all-reduce when every rank is fine (a server's every span); the messages,
        # pickled, only when one failed
        flag = torch.tensor([error is not None], dtype=torch.int32, device=_device(group))
        dist.all_reduce(flag, group=group)
        if not flag.item():
            return result
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, mine, group=group)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return result
    rank, message = failed[0]
    if len(failed) < len(messages) or len({m for _, m in failed}) > 1:
        message = f"rank {rank}: {message}"
    raise RankFailure(message) from error


def _device(group) -> torch.device:
    """Where the group's collectives take tensors (NCCL: this rank's GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _store():
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


def clear_failure() -> None:
    """Forget an earlier run's failure (call on one rank before the run's first collective)."""
    store = _store()
    if store is not None:
        store.delete_key(_FAILURE_KEY)


def announce_failure(message: str) -> None:
    """Tell the other ranks why this one is about to stop (best effort)."""
    store = _store()
    if store is None:
        return
    with contextlib.suppress(Exception):  # the store's host may be gone already
        store.set(_FAILURE_KEY, message)


def peer_failure() -> str | None:
    """The message a rank announced, if one did (no waiting: a rank announces before its exit
    breaks anyone's collective)."""
    store = _store()
    if store is None:
        return None
    try:
        return store.get(_FAILURE_KEY).decode() if store.check([_FAILURE_KEY]) else None
    except Exception:  # the store is gone with its host
        return None


def report_failure(error: Exception, debug: bool) -> int:
    """Log the one-line reason this rank stops; 1, the exit code."""
    if isinstance(error, RankFailure):
        message = str(error)  # every rank agreed on it at a check point
    else:
        # Between check points: this rank failed alone, or a peer did and its exit broke the
        # collective this rank was in (gloo: "Connection closed by peer"). The peer announced
        # its cause before exiting; report that, else announce ours.
        message = peer_failure()
        if message is None:
            message = error_message(error)
            if dist.is_initialized() and dist.get_world_size() > 1:
                message = f"rank {dist.get_rank()}: {message}"
            announce_failure(message)
    logging.getLogger("cp_infer").error("error: %s", message, exc_info=error if debug else None)
    return 1
