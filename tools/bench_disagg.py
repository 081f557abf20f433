#!/usr/bin/env python
"""Disaggregated prefill and decode against colocated serving, while a long prompt arrives.

``--clients`` streaming requests decode (``--prompt-len``-token prompts); once each has
``--warm-tokens`` tokens, one ``--long-len``-token prompt arrives. The table gives the decoding
clients' time between tokens (TBT) from its arrival to its first token, p50 and p99, and the
long prompt's TTFT, in three modes on the same ranks (``cp_infer serve`` under torchrun,
random weights, one thread per rank: on 2 cores, one core per rank):

- ``colocated``: ``--cp 2``; the long prompt prefills whole, and the decodes wait for it;
- ``colocated-slo``: ``--cp 2 --tbt-slo-ms``; it prefills in chunks sized to keep the decodes
  under the target, and its TTFT stretches instead;
- ``disaggregated``: ``--prefill tp=1 --decode tp=1``; the prefill tier (one rank) prefills
  it, its KV moves to the decode tier (one rank), which decodes throughout.

Example (the figures in docs/performance.md)::

    python tools/bench_disagg.py --preset small-llama --long-len 16384 --slo-ms 100 \\
        --json bench_out/disagg.json
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import percentile, start_server, stop_server
from bench_tbt import _scenario, run_modes, scenario_parser

from cp_infer.reporting import format_table, write_json

logger = logging.getLogger("bench_disagg")

MODES = ("colocated", "colocated-slo", "disaggregated")


def _run_mode(mode: str, args) -> dict:
    extra = ["--max-batch-size", str(args.clients + 1), "--kv-cache-memory", args.kv_memory]
    layout = (2, ["--cp", "2"])
    if mode == "colocated-slo":
        extra += ["--tbt-slo-ms", str(args.slo_ms)]
    if mode == "disaggregated":
        layout = (2, ["--prefill", "tp=1", "--decode", "tp=1",
                      "--disagg-min-tokens", str(args.disagg_min_tokens)])  # fmt: skip
    proc, url = start_server(args.preset, 2, extra, layout=layout)
    try:
        out = asyncio.run(_scenario(url, args))
    finally:
        stop_server(proc)
    gaps = out["gaps_s"]
    return {
        "mode": mode, "preset": args.preset, "clients": args.clients,
        "prompt_len": args.prompt_len, "long_len": args.long_len,
        "slo_ms": args.slo_ms if mode == "colocated-slo" else None, "gaps": len(gaps),
        "tbt_p50_s": statistics.median(gaps), "tbt_p99_s": percentile(gaps, 0.99),
        "ttft_s": out["long_ttft_s"],
    }  # fmt: skip


def main(argv=None) -> list[dict]:
    p = scenario_parser(__doc__, clients=4, modes=list(MODES))
    p.add_argument("--disagg-min-tokens", type=int, default=1024,
                   help="prompts the prefill tier takes (the decodes' are shorter)")  # fmt: skip
    p.add_argument("--kv-memory", default="256MiB", help="each rank's KV pool")
    args = p.parse_args(argv)
    records = run_modes(args, _run_mode)
    cols = ["mode", "gaps", "TBT p50 ms", "TBT p99 ms", "long TTFT s"]
    rows = [[r["mode"], str(r["gaps"]), f"{1000 * r['tbt_p50_s']:.1f}",
             f"{1000 * r['tbt_p99_s']:.1f}", f"{r['ttft_s']:.2f}"] for r in records]  # fmt: skip
    print(f"{args.preset}, 2 ranks: {args.clients} decoding while {args.long_len} tokens arrive")
    print(format_table(cols, rows))
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
