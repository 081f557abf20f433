"""``python -m cp_infer calibrate``: measure this machine for ``--hardware PATH``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cp_infer.entrypoints.launch import HelpFormatter
from cp_infer.reporting import format_table, write_json

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "calibrate", help="measure attention/GEMM FLOP/s and ring speeds into a profile",
        description=(
            "Measure this machine as the engine runs on it (gloo ranks, one thread each): "
            "attention and GEMM FLOP/s, ring bandwidth and latency, All2All. The profile is "
            "what --hardware PATH takes (Alg. 1's C and BW).\n\n"
            "  python -m cp_infer calibrate --output profile.json"
        ),
        formatter_class=HelpFormatter,
    )  # fmt: skip
    g.add_argument("--output", type=Path, required=True, metavar="JSON", help="the profile")
    g.add_argument("--world", type=int, default=2, help="ranks (on this host)")
    g.add_argument("--tokens", type=int, default=4096, help="tokens per rank in the kernels")
    g.add_argument("--message-mib", type=float, default=16.0, help="size of the large message")
    g.add_argument("--repeats", type=int, default=3, help="best of this many")
    g.set_defaults(run=run)
    return g


def run(args, argv: list[str]) -> int:
    from cp_infer.calibrate import measure_rank
    from cp_infer.testing import DistributedPool

    if args.world < 2 or args.tokens < 1 or args.repeats < 1 or args.message_mib <= 0:
        raise ValueError("--world must be >= 2 (a ring), --tokens, --repeats, --message-mib > 0")
    nbytes = int(args.message_mib * 2**20) // (4 * args.world) * 4 * args.world
    with DistributedPool(args.world, pg_timeout_s=600) as pool:
        profile = pool.run(measure_rank, args.tokens, nbytes, args.repeats, timeout_s=1200)[0]
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in profile.items()]
    print(format_table(["measure", "value"], rows))
    write_json(args.output, profile)
    return 0
