"""``python -m cp_infer calibrate``: measure this machine for ``--hardware PATH``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cp_infer.entrypoints.launch import HelpFormatter, add_common_arguments
from cp_infer.reporting import format_table, write_json

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "calibrate", help="measure attention/GEMM FLOP/s and ring speeds into a profile",
        description=(
            "Measure this machine as the engine runs on it (gloo ranks, one thread each): "
            "attention and GEMM FLOP/s, ring bandwidth and latency, All2All, how much of a ring "
            "step hides behind attention, memory bandwidth. The profile is what --hardware PATH "
            "takes: the hardware model of this machine that --variant auto, serve's chunk "
            "sizing and plan (TTFT / TTIT) read.\n\n"
            "  python -m cp_infer calibrate --output profile.json\n"
            "  python -m cp_infer plan --preset small-llama --hardware profile.json "
            "--context 16384 --cp 1,2"
        ),
        formatter_class=HelpFormatter,
    )  # fmt: skip
    g.add_argument("--output", type=Path, required=True, metavar="JSON", help="the profile")
    g.add_argument("--world", type=int, default=2, help="ranks (on this host)")
    g.add_argument("--tokens", type=int, default=4096, help="tokens per rank in the kernels")
    g.add_argument("--message-mib", type=float, default=16.0, help="size of the large message")
    g.add_argument("--memory-mib", type=float, default=256.0,
                   help="size of the tensor read to measure memory bandwidth")  # fmt: skip
    g.add_argument("--repeats", type=int, default=3, help="best of at least this many")
    g.add_argument("--min-seconds", type=float, default=0.5,
                   help="and of as many runs as fill this many seconds (short kernels)")  # fmt: skip
    add_common_arguments(g)
    g.set_defaults(run=run)
    return g


def run(args, argv: list[str]) -> int:
    from cp_infer.calibrate import measure_rank
    from cp_infer.testing import DistributedPool

    if (args.world < 2 or args.tokens < 1 or args.repeats < 1 or args.message_mib <= 0
            or args.memory_mib <= 0 or args.min_seconds < 0):  # fmt: skip
        raise ValueError(
            "--world must be >= 2 (a ring), --tokens, --repeats, --message-mib, --memory-mib > 0, --min-seconds >= 0"
        )
    nbytes = int(args.message_mib * 2**20) // (4 * args.world) * 4 * args.world
    read_bytes = max(4, int(args.memory_mib * 2**20) // 4 * 4)
    with DistributedPool(args.world, pg_timeout_s=600) as pool:
        profile = pool.run(
            measure_rank,
            args.tokens,
            nbytes,
            args.repeats,
            read_bytes,
            args.min_seconds,
            timeout_s=1200,
        )[0]
    rows = [[k, _show(v)] for k, v in profile.items() if not isinstance(v, dict)]
    rows += [  # the rate tables, one row a size
        [f"{k}[{size}]", _show(v)]
        for k, table in profile.items() if isinstance(table, dict)
        for size, v in _flat(table)
    ]  # fmt: skip
    print(format_table(["measure", "value"], rows))
    write_json(args.output, profile)
    return 0


def _show(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _flat(table: dict, prefix: str = ""):
    """(``a`` or ``a][b``, value) of a table of sizes, nested or not."""
    for k, v in table.items():
        key = f"{prefix}][{k}" if prefix else str(k)
        yield from _flat(v, key) if isinstance(v, dict) else [(key, v)]
