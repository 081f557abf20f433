#!/usr/bin/env python
"""Benchmark the sampler: one draw for each of ``--rows`` requests, on one thread.

``sample_rows`` is what every step of the server and of ``generate`` pays after the LM head.
Top-p is the costly part: the nucleus needs the tokens in order of probability. This tool
times it with a full sort of the vocabulary and with the default, the
``NUCLEUS_CANDIDATES`` most likely tokens first (a partial selection; a full sort only when they
hold too little mass), for logits as flat or as peaked as ``--scales`` make them (standard
normal logits times the scale). Plain temperature sampling, for reference, needs no order.

Example (the figures in docs/performance.md)::

    python tools/bench_sampling.py --vocab 128256 --rows 8 --json bench_out/sampling.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.engine import sampling
from cp_infer.engine.sampling import SamplingConfig, sample_rows
from cp_infer.reporting import format_table, write_json


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama 3's)")
    p.add_argument("--rows", type=int, default=8, help="requests sampled in one step")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 8.0],
                   help="logits are standard normal times this: larger is more peaked")  # fmt: skip
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=10, help="the median of this many draws")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    default_k = sampling.NUCLEUS_CANDIDATES
    records = []
    for scale in args.scales:
        logits = torch.randn(args.rows, args.vocab) * scale
        cases = [("temperature", SamplingConfig(temperature=0.8), default_k),
                 ("top-p, full sort", SamplingConfig(temperature=0.8, top_p=args.top_p),
                  args.vocab),
                 (f"top-p, top-{default_k} first",
                  SamplingConfig(temperature=0.8, top_p=args.top_p), default_k)]  # fmt: skip
        for name, cfg, k in cases:
            sampling.NUCLEUS_CANDIDATES = k
            gens = [torch.Generator().manual_seed(j) for j in range(args.rows)]
            seconds = _time(
                lambda cfg=cfg, gens=gens, logits=logits: sample_rows(
                    logits, [cfg] * args.rows, gens, [0] * args.rows
                ),
                args.repeats,
            )
            probs = torch.softmax(logits / 0.8, dim=-1)
            held = probs.topk(min(default_k, args.vocab), dim=-1).values.sum(-1).min().item()
            records.append({"vocab": args.vocab, "rows": args.rows, "scale": scale,
                            "sampling": name, "ms": seconds * 1e3,
                            "candidates_mass_min": held})  # fmt: skip
        sampling.NUCLEUS_CANDIDATES = default_k
    print(format_table(
        ["vocab", "rows", "scale", "sampling", "ms", f"top-{default_k} mass (min)"],
        [[str(r["vocab"]), str(r["rows"]), f"{r['scale']:g}", r["sampling"], f"{r['ms']:.1f}",
          f"{r['candidates_mass_min']:.3f}"] for r in records],
    ))  # fmt: skip
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
