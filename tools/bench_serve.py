#!/usr/bin/env python
"""Benchmark the server: N concurrent chat clients against ``cp_infer serve`` under torchrun.

Every client holds a conversation: its first turn is a ``--prompt-len``-token prompt, each later
turn resends the whole history (prompts and answers so far, as chat clients do) plus
``--turn-len`` new tokens. Requests go to ``/v1/completions`` as token ids with ``stream: true``,
so the first token's arrival (TTFT) and the gaps between tokens (TTIT) are seen as a client sees
them. The table gives throughput (generated tokens per second over the run), TTFT and TTIT
percentiles, and the cache hit rate: of all prompt tokens sent, the share the server did not
prefill because the ranks still held them (``usage.prompt_tokens_details.cached_tokens``).

The script starts the server itself (``--preset``, random weights) unless given ``--url``.

Example (the figures in docs/performance.md)::

    python tools/bench_serve.py --preset tiny-llama --cp 2 --clients 8 --turns 3 \\
        --json bench_out/serve_tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.distributed import free_port
from cp_infer.reporting import format_table, write_json

logger = logging.getLogger("bench_serve")


def start_server(
    preset: str, cp: int, extra: list[str] = (), log: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """``cp_infer serve`` under torchrun, one thread per rank; returns it and its URL once
    /health answers. ``log``: where its output goes (default: nowhere)."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp),
           "--master-port", str(free_port()), "-m", "cp_infer", "serve", "--preset", preset,
           "--cp", str(cp), "--port", str(port), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.DEVNULL if log is None else open(log, "w")  # noqa: SIM115 (the child's)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out,
                            stderr=subprocess.STDOUT if log else out)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up in 300 s")


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


async def _turn(client, url, tokens, max_tokens) -> dict:
    body = {"prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    arrivals, usage, out = [], None, []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            elif ev["choices"] and ev["choices"][0].get("token_ids"):
                arrivals.append(time.perf_counter())
                out += ev["choices"][0]["token_ids"]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {"ttft_s": arrivals[0] - t0, "gaps_s": gaps, "usage": usage, "tokens": out}


async def _client(i, url, args, results) -> None:
    rng = random.Random(i)
    vocab = args.vocab

    def fresh(n):
        return [rng.randrange(1, vocab) for _ in range(n)]

    history = fresh(args.prompt_len)
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(args.turns):
            r = await _turn(client, url, history, args.max_tokens)
            results.append(r)
            # the next turn resends the history, the answer and a new message
            history = history + r["tokens"] + fresh(args.turn_len)


def percentile(xs, q) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-llama")
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--url", help="an already running server (default: start one)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--turn-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument(
        "--max-cache-tokens", type=int, default=65536,
        help="the server's reuse budget; 1 turns reuse off (a cold baseline)",
    )  # fmt: skip
    p.add_argument("--vocab", type=int, default=500, help="prompt ids are drawn below this")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    extra = ["--max-batch-size", str(args.max_batch_size),
             "--max-cache-tokens", str(args.max_cache_tokens)]  # fmt: skip
    proc, url = (None, args.url) if args.url else start_server(args.preset, args.cp, extra)
    try:
        results: list[dict] = []
        t0 = time.perf_counter()

        async def run_all():
            await asyncio.gather(*(_client(i, url, args, results) for i in range(args.clients)))

        asyncio.run(run_all())
        wall = time.perf_counter() - t0
    finally:
        stop_server(proc)
    ttft = [r["ttft_s"] for r in results]
    gaps = [g for r in results for g in r["gaps_s"]]
    prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results)
    generated = sum(r["usage"]["completion_tokens"] for r in results)
    summary = {
        "preset": args.preset, "cp": args.cp, "clients": args.clients, "turns": args.turns,
        "prompt_len": args.prompt_len, "turn_len": args.turn_len, "max_tokens": args.max_tokens,
        "max_cache_tokens": args.max_cache_tokens,
        "requests": len(results), "wall_s": wall, "generated_tokens": generated,
        "throughput_tok_s": generated / wall, "cache_hit_rate": cached / prompt,
        "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": percentile(ttft, 0.9),
        "ttft_p99_s": percentile(ttft, 0.99), "ttit_p50_s": statistics.median(gaps) if gaps else None,
        "ttit_p90_s": percentile(gaps, 0.9), "ttit_p99_s": percentile(gaps, 0.99),
    }  # fmt: skip
    cols = ["preset", "cp", "clients", "requests", "tok/s", "hit rate", "TTFT p50/p90/p99 (ms)",
            "TTIT p50/p90/p99 (ms)"]  # fmt: skip
    ms = 1000
    row = [args.preset, str(args.cp), str(args.clients), str(len(results)),
           f"{summary['throughput_tok_s']:.1f}", f"{summary['cache_hit_rate']:.3f}",
           f"{ms * summary['ttft_p50_s']:.0f}/{ms * summary['ttft_p90_s']:.0f}/"
           f"{ms * summary['ttft_p99_s']:.0f}",
           f"{ms * summary['ttit_p50_s']:.1f}/{ms * summary['ttit_p90_s']:.1f}/"
           f"{ms * summary['ttit_p99_s']:.1f}"]  # fmt: skip
    print(format_table(cols, [row]))
    if args.json:
        write_json(args.json, {"summary": summary, "requests": results})
    return summary


if __name__ == "__main__":
    main()
