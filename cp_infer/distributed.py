"""Small distributed helpers for the CLI and the engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

__all__ = ["on_all_ranks"]

T = TypeVar("T")


def on_all_ranks(fn: Callable[[], T], group=None) -> T:
    """Run ``fn`` on every rank; if it raises ValueError on any rank, raise it on all of them.

    For checks whose outcome differs between ranks (a checkpoint tensor only one pipeline
    stage reads, say): without this, the ranks that passed would go on into a collective that
    the failed ranks never join, and wait there until the timeout.
    """
    error: str | None = None
    result = None
    try:
        result = fn()
    except ValueError as e:
        error = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        errors: list[str | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise ValueError(message if error is not None else f"rank {rank}: {message}")
    elif error is not None:
        raise ValueError(error)
    return result
