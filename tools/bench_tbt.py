#!/usr/bin/env python
"""Time between tokens while a long prompt arrives: the server with and without adaptive chunks.

``--clients`` streaming requests decode (``--prompt-len``-token prompts, no token budget to
speak of); once each has ``--warm-tokens`` tokens, one ``--long-len``-token prompt arrives. The
table gives the decoding clients' time between tokens (TBT) while the long prompt is prefilled
(from its arrival to its first token), p50 / p99 / max, the share of gaps within the target,
and the long prompt's TTFT. Each mode runs its own server (``cp_infer serve`` under torchrun,
random weights, one thread per rank):

- ``whole``: no target; the long prompt prefills in one step, and the decodes wait for it;
- ``adaptive``: ``--tbt-slo-ms``; each iteration prefills the chunk that keeps the decodes'
  TBT under the target (sized from ``--hardware``'s profile and the measured step times).

Example (the figures in docs/performance.md)::

    python -m cp_infer calibrate --output bench_out/profile.json
    python tools/bench_tbt.py --preset small-llama --cp 2 --long-len 16384 --slo-ms 100 \\
        --hardware bench_out/profile.json --json bench_out/tbt.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import percentile, start_server, stop_server

from cp_infer.reporting import format_table, write_json

logger = logging.getLogger("bench_tbt")


async def _stream(client, url, tokens, max_tokens, arrivals: list, stop: asyncio.Event | None):
    """Stream one completion, appending each token's arrival time; stops early on ``stop``."""
    body = {"prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if ev["choices"] and ev["choices"][0].get("token_ids"):
                    arrivals.append(time.perf_counter())
            if stop is not None and stop.is_set():
                return  # closing the stream cancels the request


async def _scenario(url: str, args) -> dict:
    rng = random.Random(0)
    stop = asyncio.Event()
    decodes: list[list[float]] = [[] for _ in range(args.clients)]
    long_arrivals: list[float] = []
    async with httpx.AsyncClient(timeout=1800) as client:
        tasks = [
            asyncio.create_task(_stream(
                client, url, [rng.randrange(1, args.vocab) for _ in range(args.prompt_len)],
                args.max_tokens, decodes[i], stop,
            ))
            for i in range(args.clients)
        ]  # fmt: skip
        while min(len(a) for a in decodes) < args.warm_tokens:
            if any(t.done() for t in tasks):
                raise RuntimeError("a decoding client ended before the long prompt was sent")
            await asyncio.sleep(0.01)
        long = [rng.randrange(1, args.vocab) for _ in range(args.long_len)]
        sent = time.perf_counter()
        await _stream(client, url, long, 2, long_arrivals, None)
        await asyncio.sleep(0.2)  # a few gaps after the prefill
        stop.set()
        await asyncio.gather(*tasks)
    first = long_arrivals[0]
    # the gaps that end while the long prompt is prefilled (and the one that spans its end)
    window = [b - a for arr in decodes for a, b in itertools.pairwise(arr)
              if b > sent and a < first]  # fmt: skip
    return {"long_ttft_s": first - sent, "gaps_s": window}


def _run_mode(mode: str, args) -> dict:
    extra = ["--max-batch-size", str(args.clients + 1)]
    if args.hardware:
        extra += ["--hardware", str(args.hardware)]
    if mode == "adaptive":
        extra += ["--tbt-slo-ms", str(args.slo_ms)]
    if args.ring_min_tokens is not None:
        extra += ["--ring-min-tokens", args.ring_min_tokens]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, url = start_server(args.preset, args.cp, extra, log=log)
        try:
            out = asyncio.run(_scenario(url, args))
        finally:
            stop_server(proc)
        chunks = _long_chunks(log.read_text(), args.long_len)
    gaps, slo = out["gaps_s"], args.slo_ms / 1000
    return {
        "mode": mode, "preset": args.preset, "cp": args.cp, "clients": args.clients,
        "prompt_len": args.prompt_len, "long_len": args.long_len, "slo_ms": args.slo_ms,
        "ring_min_tokens": args.ring_min_tokens,
        "gaps": len(gaps), "tbt_p50_ms": 1000 * statistics.median(gaps),
        "tbt_p99_ms": 1000 * percentile(gaps, 0.99), "tbt_max_ms": 1000 * max(gaps),
        "within_slo": sum(g <= slo for g in gaps) / len(gaps), "long_ttft_s": out["long_ttft_s"],
        "chunks": chunks,
    }  # fmt: skip


def _long_chunks(log: str, long_len: int) -> list[int]:
    """The long prompt's prefill steps, from the server's log (rank 0's "prefill of N new
    tokens" lines: the last ones, which add up to it)."""
    steps = [int(m) for m in re.findall(r"\[rank 0/\d+\].*prefill of (\d+) new tokens", log)]
    chunks, total = [], 0
    for n in reversed(steps):
        if total >= long_len:
            break
        chunks.append(n)
        total += n
    return chunks[::-1] if total == long_len else []


def scenario_parser(doc: str, *, clients: int, modes: list[str]) -> argparse.ArgumentParser:
    """The arguments of the scenario (:func:`_scenario`), shared with bench_disagg."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--preset", default="small-llama")
    p.add_argument("--clients", type=int, default=clients, help="requests decoding meanwhile")
    p.add_argument("--prompt-len", type=int, default=256, help="their prompts' tokens")
    p.add_argument("--max-tokens", type=int, default=8192, help="their budget (they are stopped)")
    p.add_argument("--warm-tokens", type=int, default=16, help="tokens each has before")
    p.add_argument("--long-len", type=int, default=16384, help="the arriving prompt's tokens")
    p.add_argument("--slo-ms", type=float, default=100.0, help="the TBT target")
    p.add_argument("--modes", nargs="+", choices=modes, default=modes)
    p.add_argument("--vocab", type=int, default=500, help="prompt ids are drawn below this")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the records")
    return p


def run_modes(args, run_mode) -> list[dict]:
    """``run_mode(mode, args)`` for each of ``args.modes``, logged."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    records = []
    for mode in args.modes:
        logger.info("mode %s", mode)
        records.append(run_mode(mode, args))
    return records


def main(argv=None) -> list[dict]:
    p = scenario_parser(__doc__, clients=3, modes=["whole", "adaptive"])
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--hardware", type=Path, help="a calibrated profile for the server")
    p.add_argument(
        "--ring-min-tokens", metavar="N|auto",
        help="the server's --ring-min-tokens (default: serve's, auto): 0 puts the decoding "
        "requests on the ring too; a value between --prompt-len and --long-len places them on "
        "single ranks and the long prompt on the ring",
    )  # fmt: skip
    args = p.parse_args(argv)
    records = run_modes(args, _run_mode)
    cols = ["mode", "target ms", "gaps", "TBT p50 ms", "TBT p99 ms", "TBT max ms", "within",
            "long TTFT s", "chunks", "chunk min/median/max"]  # fmt: skip
    rows = [[r["mode"], f"{r['slo_ms']:.0f}" if r["mode"] == "adaptive" else "-", str(r["gaps"]),
             f"{r['tbt_p50_ms']:.1f}", f"{r['tbt_p99_ms']:.1f}", f"{r['tbt_max_ms']:.1f}",
             f"{r['within_slo']:.2f}", f"{r['long_ttft_s']:.2f}", str(len(r["chunks"])),
             "/".join(str(x) for x in (min(r["chunks"]), int(statistics.median(r["chunks"])),
                                       max(r["chunks"]))) if r["chunks"] else "?"]
            for r in records]  # fmt: skip
    placed = "" if args.ring_min_tokens is None else f", --ring-min-tokens {args.ring_min_tokens}"
    print(f"{args.preset} cp={args.cp}: {args.clients} decoding while {args.long_len} tokens "
          f"arrive{placed}")  # fmt: skip
    print(format_table(cols, rows))
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
