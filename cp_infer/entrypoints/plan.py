"""``python -m cp_infer plan``: what a layout will do, before renting the GPUs."""

from __future__ import annotations

import argparse
from pathlib import Path

from cp_infer.costmodel import PROFILES, plan_prefill
from cp_infer.entrypoints.launch import HelpFormatter
from cp_infer.models.config import PRESETS, get_preset
from cp_infer.reporting import format_table, write_json

__all__ = ["add_parser", "run"]

_DESCRIPTION = """\
TTFT, TTIT and scaling of one prompt over CP sizes, from first principles: the model's FLOPs and
bytes, a hardware profile and achieved utilizations documented in cp_infer/costmodel.py (it
reproduces the paper's 3.8 s for a 128K prefill and 77 s for 1M of Llama 3 405B on 16 hosts).

  python -m cp_infer plan --preset llama3-405b --hardware h100-rdma --context 131072 \\
      --cp 1,2,4,8,16 --json plan.json
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "plan", help="predict TTFT / TTIT of a layout (cost model)",
        description=_DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    g.add_argument("--preset", choices=sorted(PRESETS), required=True, help="the model shape")
    g.add_argument("--hardware", choices=sorted(PROFILES), default="h100-rdma",
                   help="the hosts: the paper's H100s over RDMA or TCP")  # fmt: skip
    g.add_argument("--context", type=int, required=True, help="prompt tokens")
    g.add_argument("--cp", default="1,2,4,8,16", help="CP sizes (hosts), comma-separated")
    g.add_argument("--tp", type=int, default=8, help="GPUs per host (TP inside a host)")
    g.add_argument("--json", type=Path, metavar="PATH", help="also write the records")
    g.set_defaults(run=run)
    return g


def run(args, argv: list[str]) -> int:
    try:
        cps = [int(x) for x in args.cp.split(",")]
    except ValueError:
        raise ValueError(f"--cp takes sizes like 1,2,4,8,16, got {args.cp!r}") from None
    if any(n < 1 for n in cps) or args.context < 1 or args.tp < 1:
        raise ValueError("--cp sizes, --tp and --context must be >= 1")
    cfg, prof = get_preset(args.preset), PROFILES[args.hardware]
    records = [plan_prefill(cfg, prof, cp=n, tp=args.tp, context=args.context) for n in cps]
    rows = [[str(r.cp), str(r.tp), str(r.context), f"{r.ttft_s:.2f}", f"{1000 * r.ttit_s:.1f}",
             r.variant, f"{r.efficiency:.3f}", f"{1000 * r.gemm_s_per_layer:.2f}",
             f"{1000 * r.attention_s_per_layer:.2f}", f"{1000 * r.comm_s_per_layer:.3f}",
             f"{r.memory_bytes_per_gpu / 2**30:.1f}"] for r in records]  # fmt: skip
    print(f"{cfg.name} on {args.hardware}, {args.context} tokens:")
    print(format_table(["cp", "tp", "context", "ttft_s", "ttit_ms", "variant", "efficiency",
                        "gemm_ms/layer", "attn_ms/layer", "comm_ms/layer", "GiB/GPU"], rows))  # fmt: skip
    if args.json:
        write_json(args.json, [r.to_dict() for r in records])
    return 0
