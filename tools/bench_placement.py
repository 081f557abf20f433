#!/usr/bin/env python
"""Where the ring starts to pay, measured through the server and predicted by the hardware model.

A request shorter than ``serve --ring-min-tokens`` runs on a single CP rank (its KV there,
local attention, no CP collective); a longer one on the ring. ``auto`` takes the threshold from
the hardware model: the shortest prompt whose modelled ring prefill beats one rank's
(:func:`cp_infer.costmodel.ring_min_tokens`). This tool measures that break-even on this
machine. Two servers run in turn (``cp_infer serve`` under torchrun, random weights, one
thread per rank): one with every request on the ring (``--ring-min-tokens 0``), one with every
request on one rank. Each gets the same lone requests (fresh prompts of each ``--lengths``,
one at a time, ``--repeats`` of each, one output token), and the table gives the median TTFT of
each length on both. The measured threshold is where the ring's TTFT falls below the rank's
(interpolated between the two lengths around the crossing, on a log scale); the predicted one
is the hardware model's for ``--hardware`` (the calibrated profile of this machine).

Example (the figures in docs/performance.md)::

    python -m cp_infer calibrate --output bench_out/profile.json
    python tools/bench_placement.py --preset small-llama --cp 2 \\
        --hardware bench_out/profile.json --json bench_out/placement.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import _turn, start_server, stop_server

from cp_infer import costmodel
from cp_infer.hardware import hardware_for, profile
from cp_infer.models import get_preset
from cp_infer.reporting import format_table, write_json

logger = logging.getLogger("bench_placement")

#: --ring-min-tokens of the server whose requests all run on one rank
NEVER = 1 << 40


def measure(url: str, lengths: list[int], repeats: int, vocab: int, seed: int) -> dict[int, float]:
    """Median TTFT (s) of lone requests of each length (fresh prompts: no cache hit)."""
    rng = random.Random(seed)

    async def run() -> dict[int, float]:
        out = {}
        async with httpx.AsyncClient(timeout=3600) as client:
            await _turn(client, url, [rng.randrange(1, vocab) for _ in range(16)], 1)  # warm up
            for n in lengths:
                ttft = []
                for _ in range(repeats):
                    prompt = [rng.randrange(1, vocab) for _ in range(n)]
                    ttft.append((await _turn(client, url, prompt, 1))["ttft_s"])
                out[n] = statistics.median(ttft)
        return out

    return asyncio.run(run())


def crossover(lengths: list[int], ring: dict[int, float], rank: dict[int, float]) -> float | None:
    """The prompt length from which the ring's TTFT stays below one rank's: between the last
    length where it is not and the next, where the two log-log lines cross. None: the ring is
    never faster; the first length: it is faster at every length measured."""
    above = [n for n in lengths if ring[n] >= rank[n]]
    if not above:
        return float(lengths[0])
    last = max(above)
    later = [n for n in lengths if n > last]
    if not later:
        return None
    a, b = last, later[0]
    # the log ratio ring/rank goes from >= 0 at a to < 0 at b: interpolate on log(length)
    ra, rb = math.log(ring[a] / rank[a]), math.log(ring[b] / rank[b])
    f = ra / (ra - rb)
    return math.exp(math.log(a) + f * (math.log(b) - math.log(a)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--preset", default="small-llama")
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="requests per length (median)")
    p.add_argument("--hardware", help="a calibrated profile (or built-in name) for the server "
                   "and the prediction (default: the built-in CPU profile)")  # fmt: skip
    p.add_argument("--vocab", type=int, default=500, help="prompt ids are drawn below this")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the record")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    lengths = sorted(set(args.lengths))
    measured = {}
    for name, threshold in (("ring", 0), ("rank", NEVER)):
        extra = ["--ring-min-tokens", str(threshold), "--max-batch-size", "1"]
        if args.hardware:
            extra += ["--hardware", args.hardware]
        logger.info("server with every request on the %s", name)
        proc, url = start_server(args.preset, args.cp, extra)
        try:
            measured[name] = measure(url, lengths, args.repeats, args.vocab, seed=len(measured))
        finally:
            stop_server(proc)
    cfg = get_preset(args.preset)
    prof = profile(args.hardware) if args.hardware else hardware_for("cpu")
    predicted = costmodel.ring_min_tokens(cfg, prof, cp=args.cp, tp=1, bytes_per_element=4)
    found = crossover(lengths, measured["ring"], measured["rank"])
    rows = [[str(n), f"{1000 * measured['ring'][n]:.1f}", f"{1000 * measured['rank'][n]:.1f}",
             f"{measured['rank'][n] / measured['ring'][n]:.2f}"] for n in lengths]  # fmt: skip
    print(f"{args.preset} cp={args.cp}: lone requests, median TTFT of {args.repeats}")
    print(format_table(["prompt tokens", "ring ms", "one rank ms", "rank / ring"], rows))
    ratio = None if not (found and predicted) else predicted / found
    print(f"ring threshold: measured {found and round(found)} tokens, predicted {predicted} "
          f"({prof.name})" + (f": {ratio:.2f}x the measured" if ratio else ""))  # fmt: skip
    record = {"preset": args.preset, "cp": args.cp, "repeats": args.repeats,
              "hardware": prof.name, "lengths": lengths,
              "ring_ttft_s": [measured["ring"][n] for n in lengths],
              "rank_ttft_s": [measured["rank"][n] for n in lengths],
              "measured_threshold": found, "predicted_threshold": predicted}  # fmt: skip
    if args.json:
        write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
