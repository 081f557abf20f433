"""Logging with the rank in every record: ``[rank 1/4] cp_infer.x: message``."""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["setup_logging"]


class _RankFilter(logging.Filter):
    """The launcher's global rank (two tiers' ranks are each their tier's default group's, but
    the records name them as the job does), else the default group's, if torch is loaded (a
    record never imports it: the API process has none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        dist = sys.modules.get("torch.distributed")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            record.rank, record.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        elif dist is not None and dist.is_available() and dist.is_initialized():
            record.rank, record.world = dist.get_rank(), dist.get_world_size()
        else:
            record.rank = int(os.environ.get("RANK", 0))
            record.world = int(os.environ.get("WORLD_SIZE", 1))
        return True


def setup_logging(level: int | str = logging.INFO, *, all_ranks: bool = False) -> None:
    """Configure the root logger once per process.

    Args:
        level: log level for rank 0 (and every rank when ``all_ranks``).
        all_ranks: if False, ranks other than 0 only log warnings and errors.
    """
    rank = int(os.environ.get("RANK", 0))
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s [rank %(rank)d/%(world)d] %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if all_ranks or rank == 0 else logging.WARNING)
    # megatron-core announces at import that Transformer Engine / apex are absent: expected on CPU.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
