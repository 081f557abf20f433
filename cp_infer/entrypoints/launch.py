"""How a front door finds its ranks: started by torchrun or DeepSpeed's launcher, or alone.

Launchers describe the world in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``, ``LOCAL_RANK``). A command started without one runs as a single process if
its layout needs only one; otherwise it stops and prints the command line that launches it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex

from cp_infer.distributed import free_port
from parallel_state import validate_parallel_sizes

__all__ = ["HelpFormatter", "add_common_arguments", "ensure_launched", "processes_needed"]

logger = logging.getLogger(__name__)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps descriptions as written; shows each option's default once, and only a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        no_default = action.default is None or action.default is False
        if no_default or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """What every command takes: ``--debug``, and a launcher's ``--local_rank=N`` (DeepSpeed's
    launcher puts it before the command; this accepts it after, too)."""
    parser.add_argument("--debug", action="store_true", help="show tracebacks with errors")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def processes_needed(*, tp: int, cp: int, pp: int, ep: int) -> int:
    """The smallest world size this layout runs at (``tp*cp*pp``, times DP replicas for EP).

    Raises:
        ValueError: no world size fits (the message of the ``tp*cp*pp`` world names the fix).
    """
    base = tp * cp * pp
    for dp in range(1, max(ep, 1) + 1):
        try:
            validate_parallel_sizes(base * dp, tp=tp, cp=cp, pp=pp, ep=ep)
            return base * dp
        except ValueError:
            continue
    validate_parallel_sizes(base, tp=tp, cp=cp, pp=pp, ep=ep)  # raises with the fix
    raise AssertionError("unreachable")


def ensure_launched(argv: list[str], *, tp: int, cp: int, pp: int, ep: int) -> None:
    """Make sure this process knows its rank, or say how to launch the command.

    Under a launcher (``RANK`` and ``WORLD_SIZE`` set) nothing changes. Otherwise a layout
    of one process runs here as rank 0 of 1 (on a free local port); a larger one raises.

    Raises:
        ValueError: the layout needs several processes; the message gives the torchrun and
            deepspeed command lines for this very invocation.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    n = processes_needed(tp=tp, cp=cp, pp=pp, ep=ep)
    if n == 1:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
        logger.info("no launcher found: running as a single process (world size 1)")
        return
    args = shlex.join(argv)
    raise ValueError(
        f"tp={tp} cp={cp} pp={pp} ep={ep} needs {n} processes, one per rank, but this one was "
        "not started by a launcher (RANK and WORLD_SIZE are not set). Launch it with "
        f"`torchrun --standalone --nproc-per-node {n} -m cp_infer {args}` or "
        f"`deepspeed --num_gpus {n} --module cp_infer {args}`"
    )
