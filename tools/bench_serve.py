#!/usr/bin/env python
"""Benchmark a server: ``cp_infer serve`` under torchrun, or any OpenAI-compatible peer.

Six workloads (``--workload``):

- ``chat``: N concurrent chat clients. Every client holds a conversation: its first turn is a
  ``--prompt-len``-token prompt, each later turn resends the whole history (prompts and answers
  so far, as chat clients do) plus ``--turn-len`` new tokens; the cache hit rate is the share of
  prompt tokens the server did not prefill (``usage.prompt_tokens_details.cached_tokens``).
- ``requests``: ``--requests`` independent prompts of ``--prompt-len`` tokens, ``--clients`` at
  a time, each asking for ``--max-tokens``: the peer comparison's loads (16 x 512 tokens, 64 out,
  8 at a time; one 16K prompt). Every round draws fresh prompts (a peer that reuses prefixes
  across requests gets no free hits), after one untimed warm-up round.
- ``shared-prefix``: a long system prompt (``--system-len`` tokens) and many users: after one
  untimed request has cached it, ``--requests`` users each send it with ``--prompt-len`` tokens
  of their own, ``--clients`` at a time. Compare with ``--no-prefix-sharing``.
- ``pressure``: ``--requests`` fresh prompts of ``--prompt-len`` tokens all at once, with a
  ``--kv-cache-memory`` that holds a fraction of their KV: requests wait and are preempted.
- ``questions``: a trained chat model's real workload: ``--requests`` short questions (drawn
  fresh every round from templates: arithmetic, facts, one-sentence descriptions) through
  ``/v1/chat/completions`` and the model's chat template, ``--clients`` at a time, each answer
  ending at the model's EOS (variable lengths, at most ``--max-tokens``), or with
  ``--ignore-eos`` always ``--max-tokens`` long (cp_infer and vLLM take ``ignore_eos``). The
  table adds the answers' lengths.

- ``revisit``: ``--clients`` chats take turns one at a time, round-robin, for ``--turns`` turns
  each: every turn resends its chat's history plus ``--turn-len`` new tokens. With a
  ``--kv-cache-memory`` that holds one chat, every chat's history is evicted by the time its
  next turn comes: without a KV tier it is prefilled again, with ``--kv-tier DIR`` it is read
  back. The table adds the first turns' TTFT (a cold prefill) against the later turns'.

For ``cp_infer`` the table adds what its ``/metrics`` counted over the run: the prompt tokens
prefilled (the rest were found cached: "saved"), requests preempted, requests that waited for
room in the pool.

Requests go to ``/v1/completions`` with ``stream: true``, so the first token's arrival (TTFT)
and the gaps between tokens (ITL) are seen as a client sees them. With ``--text`` the prompts
are text (what every OpenAI-compatible server takes): random token ids decoded with the
checkpoint's tokenizer; the counts in the table are the servers' own ``usage``.

The script starts the server itself: ``--server cp_infer`` (``--preset`` with random weights,
or ``--checkpoint``) or ``--server transformers`` (``transformers serve --continuous-batching``
on ``--checkpoint``, ``--peer-threads`` intra-op threads), unless given ``--url``.

Examples (the figures in docs/performance.md)::

    python tools/bench_serve.py --preset tiny-llama --cp 2 --clients 8 --turns 3 \\
        --json bench_out/serve_tiny.json
    python tools/bench_serve.py --workload requests --server transformers \\
        --checkpoint demo_out/small-llama-hf --text --requests 16 --prompt-len 512 \\
        --max-tokens 64 --clients 8 --json bench_out/peer_short.json
    python tools/bench_serve.py --workload shared-prefix --preset small-llama --system-len 4096 \\
        --prompt-len 64 --requests 32 --clients 8 --json bench_out/shared.json
    python tools/bench_serve.py --workload pressure --preset small-llama --requests 16 \\
        --prompt-len 2048 --max-tokens 64 --kv-cache-memory 24MiB --json bench_out/pressure.json
    python tools/bench_serve.py --workload revisit --preset small-llama --clients 2 --turns 3 \\
        --prompt-len 16384 --kv-cache-memory 48MiB --kv-tier bench_out/kv_tier \\
        --json bench_out/revisit_tier.json
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
    preset: str | None,
    cp: int,
    extra: list[str] = (),
    log: Path | None = None,
    *,
    checkpoint: Path | None = None,
    server: str = "cp_infer",
    threads: int = 2,
    layout: tuple[int, list[str]] | None = None,
) -> tuple[subprocess.Popen, str]:
    """``cp_infer serve`` under torchrun, one thread per rank (or the peer: ``transformers
    serve --continuous-batching`` with ``threads`` threads); returns it and its URL once it
    answers. ``log``: where its output goes (default: nowhere). ``layout``: (processes, the
    layout's flags) in place of ``--cp cp`` (two tiers, say)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if server == "transformers":
        cmd = [str(Path(sys.executable).with_name("transformers")), "serve", str(checkpoint),
               "--continuous-batching", "--device", "cpu", "--dtype", "float32",
               "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
        env["OMP_NUM_THREADS"] = str(threads)
        health = "/health"
    else:
        model = ["--preset", preset] if checkpoint is None else ["--checkpoint", str(checkpoint)]
        nproc, flags = layout or (cp, ["--cp", str(cp)])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "cp_infer", "serve", *model,
               *flags, "--port", str(port), *extra]  # fmt: skip
        health = "/health"
    out = subprocess.DEVNULL if log is None else open(log, "w")  # noqa: SIM115 (the child's)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out,
                            stderr=subprocess.STDOUT if log else out)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + health, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up in 300 s")


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _turn(client, url, prompt, max_tokens, model: str | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if model is not None:
        body["model"] = model
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
            if ev.get("choices") and (
                ev["choices"][0].get("token_ids") or ev["choices"][0].get("text")
            ):
                arrivals.append(time.perf_counter())  # a token (the peer sends its text only)
                out += ev["choices"][0].get("token_ids") or []
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


# questions a small instruct model answers in a sentence or a few, with slots drawn per request
_QUESTIONS = (
    "What is {a} plus {b}?",
    "What is {a} times {b}? Answer with the number.",
    "Write one sentence about a {animal}.",
    "Name three things that are {color}.",
    "What is the capital of {country}?",
    "Give me a short tip for {activity}.",
    "Is {a} an even number? Explain briefly.",
    "Describe the taste of a {fruit} in a few words.",
)
_SLOTS = {
    "animal": ("cat", "dog", "horse", "owl", "dolphin", "fox", "bee", "turtle"),
    "color": ("red", "green", "blue", "yellow", "white", "orange"),
    "country": ("France", "Japan", "Italy", "Spain", "Canada", "Egypt", "Brazil", "Germany"),
    "activity": ("running", "cooking", "studying", "sleeping well", "saving money", "gardening"),
    "fruit": ("lemon", "mango", "banana", "cherry", "pear", "grape"),
}


def _questions(rng: random.Random, n: int) -> list[str]:
    """``n`` questions, each a template with its slots drawn from ``rng``."""
    out = []
    for _ in range(n):
        slots = {k: rng.choice(v) for k, v in _SLOTS.items()}
        out.append(rng.choice(_QUESTIONS).format(a=rng.randrange(2, 100),
                                                 b=rng.randrange(2, 100), **slots))  # fmt: skip
    return out


async def _ask(client, url, question: str, args, model: str | None) -> dict:
    """One streamed chat request: its timings, usage, finish reason and answer."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if args.ignore_eos:
        body["ignore_eos"] = True
    if model is not None:
        body["model"] = model
    t0 = time.perf_counter()
    arrivals, usage, text, finish = [], None, "", None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            usage = ev.get("usage") or usage
            for c in ev.get("choices") or ():
                finish = c.get("finish_reason") or finish
                piece = (c.get("delta") or {}).get("content")
                if piece or c.get("token_ids"):
                    arrivals.append(time.perf_counter())
                    text += piece or ""
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {"ttft_s": arrivals[0] - t0, "gaps_s": gaps, "usage": usage, "question": question,
            "answer": text, "finish_reason": finish}  # fmt: skip


def run_questions(url, args, model) -> tuple[list[dict], float]:
    """A warm-up round, then ``--rounds`` timed rounds of fresh questions."""
    return _timed_rounds(args, _questions, lambda client, q: _ask(client, url, q, args, model))


def _prompts(args, rng: random.Random, n: int, tokenizer) -> list:
    """``n`` fresh prompts of ``--prompt-len`` random tokens: ids, or (``--text``) their text."""
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, args.vocab) for _ in range(args.prompt_len)]
        out.append(tokenizer.decode(ids) if tokenizer is not None else ids)
    return out


async def _round(args, items, ask) -> tuple[list[dict], float]:
    """``ask(client, item)`` for every item, ``--clients`` at a time: the results and the
    round's wall time."""
    gate = asyncio.Semaphore(args.clients)
    async with httpx.AsyncClient(timeout=3600) as client:

        async def one(item):
            async with gate:
                return await ask(client, item)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(x) for x in items))
        return list(results), time.perf_counter() - t0


def _timed_rounds(args, draw, ask) -> tuple[list[dict], float]:
    """A warm-up round, then ``--rounds`` timed rounds, each of ``draw(rng, n)`` fresh items."""
    rng = random.Random(0)
    asyncio.run(_round(args, draw(rng, min(args.clients, args.requests)), ask))
    results, wall = [], 0.0
    for _ in range(args.rounds):
        got, seconds = asyncio.run(_round(args, draw(rng, args.requests), ask))
        results += got
        wall += seconds
    return results, wall


async def _requests_round(url, args, prompts, model) -> tuple[list[dict], float]:
    """Every prompt once, ``--clients`` at a time: the results and the round's wall time."""
    return await _round(
        args, prompts, lambda client, p: _turn(client, url, p, args.max_tokens, model)
    )


def run_requests(url, args, model) -> tuple[list[dict], float]:
    """A warm-up round, then ``--rounds`` timed rounds, each with fresh prompts."""
    tokenizer = None
    if args.text:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    return _timed_rounds(
        args, lambda rng, n: _prompts(args, rng, n, tokenizer),
        lambda client, p: _turn(client, url, p, args.max_tokens, model),
    )  # fmt: skip


def run_shared_prefix(url, args) -> tuple[list[dict], float]:
    """One untimed request caches the system prompt; then ``--requests`` users, each with
    ``--prompt-len`` tokens of their own after it, ``--clients`` at a time."""
    rng = random.Random(0)
    system = [rng.randrange(1, args.vocab) for _ in range(args.system_len)]
    asyncio.run(_requests_round(url, args, [[*system, args.vocab]], None))
    users = [system + [rng.randrange(1, args.vocab) for _ in range(args.prompt_len)]
             for _ in range(args.requests)]  # fmt: skip
    return asyncio.run(_requests_round(url, args, users, None))


def run_pressure(url, args) -> tuple[list[dict], float]:
    """``--requests`` fresh prompts at once (the pool's budget decides what runs)."""
    rng = random.Random(0)
    args.clients = args.requests
    return asyncio.run(_requests_round(url, args, _prompts(args, rng, args.requests, None), None))


def scrape(url: str) -> dict[str, float]:
    """cp_infer's unlabeled ``/metrics`` samples, and the placement counts as
    ``cp_infer_requests_placed_total:ring`` and ``:rank`` ({} for a server without them)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=30).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        out = {s.name: s.value for s in samples if not s.labels}
        for s in samples:  # the placement counts, by placement
            if s.name == "cp_infer_requests_placed_total":
                out[f"{s.name}:{s.labels['placement']}"] = s.value
        return out
    except (httpx.HTTPError, ValueError):
        return {}


def run_revisit(url, args) -> tuple[list[dict], float]:
    """``--clients`` chats, one turn at a time, round-robin (each turn's TTFT is its own)."""
    rngs = [random.Random(i) for i in range(args.clients)]

    def fresh(i, n):
        return [rngs[i].randrange(1, args.vocab) for _ in range(n)]

    histories = [fresh(i, args.prompt_len) for i in range(args.clients)]
    results: list[dict] = []

    async def run_all():
        async with httpx.AsyncClient(timeout=1800) as client:
            for turn in range(args.turns):
                for i in range(args.clients):
                    r = await _turn(client, url, histories[i], args.max_tokens)
                    results.append({**r, "turn": turn})
                    logger.info("chat %d turn %d: %d prompt tokens, TTFT %.2f s", i, turn,
                                r["usage"]["prompt_tokens"], r["ttft_s"])  # fmt: skip
                    histories[i] = histories[i] + r["tokens"] + fresh(i, args.turn_len)

    t0 = time.perf_counter()
    asyncio.run(run_all())
    return results, time.perf_counter() - t0


def run_chat(url, args) -> tuple[list[dict], float]:
    results: list[dict] = []
    t0 = time.perf_counter()

    async def run_all():
        await asyncio.gather(*(_client(i, url, args, results) for i in range(args.clients)))

    asyncio.run(run_all())
    return results, time.perf_counter() - t0


def percentile(xs, q) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(args, results: list[dict], wall: float, counted: dict | None = None) -> dict:
    ttft = [r["ttft_s"] for r in results]
    gaps = [g for r in results for g in r["gaps_s"]]
    prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    details = [(r["usage"].get("prompt_tokens_details") or {}) for r in results]
    cached = sum(d.get("cached_tokens") or 0 for d in details)
    generated = sum(r["usage"]["completion_tokens"] for r in results)
    lengths = [r["usage"]["completion_tokens"] for r in results]
    return {
        "server": args.server if not args.url else args.url, "workload": args.workload,
        "preset": args.preset, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "cp": args.cp, "clients": args.clients, "turns": args.turns,
        "prompt_len": args.prompt_len, "turn_len": args.turn_len, "max_tokens": args.max_tokens,
        "kv_cache_memory": args.kv_cache_memory,
        "requests": len(results), "wall_s": wall, "prompt_tokens": prompt,
        "generated_tokens": generated,
        "throughput_tok_s": generated / wall, "cache_hit_rate": cached / prompt,
        "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": percentile(ttft, 0.9),
        "ttft_p99_s": percentile(ttft, 0.99), "ttit_p50_s": statistics.median(gaps) if gaps else None,
        "ttit_p90_s": percentile(gaps, 0.9), "ttit_p99_s": percentile(gaps, 0.99),
        "system_len": args.system_len, "prefix_sharing": args.prefix_sharing,
        # what the server's /metrics counted over the timed requests (cp_infer only)
        "prefilled_tokens": (counted or {}).get("prefill_tokens_total"),
        "preemptions": (counted or {}).get("num_preemptions_total"),
        "waits": (counted or {}).get("kv_admission_waits_total"),
        "placed_ring": (counted or {}).get("requests_placed_total:ring"),
        "placed_rank": (counted or {}).get("requests_placed_total:rank"),
        "ring_min_tokens": args.ring_min_tokens,
        "ignore_eos": args.ignore_eos, "answer_tokens_min": min(lengths),
        "answer_tokens_mean": generated / len(results), "answer_tokens_max": max(lengths),
        "stopped_at_eos": sum(r.get("finish_reason") == "stop" for r in results),
        "kv_tier": str(args.kv_tier) if args.kv_tier else None,
        "tier_hits": (counted or {}).get("external_prefix_cache_hits_total"),
        "tier_load_bytes": (counted or {}).get("kv_offload_load_bytes_total"),
        "tier_load_s": (counted or {}).get("kv_offload_load_time_total"),
        "tier_store_bytes": (counted or {}).get("kv_offload_store_bytes_total"),
        "first_turn_ttft_p50_s": _median([r["ttft_s"] for r in results if r.get("turn") == 0]),
        "later_turn_ttft_p50_s": _median([r["ttft_s"] for r in results if r.get("turn")]),
    }  # fmt: skip


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload",
                   choices=["chat", "requests", "shared-prefix", "pressure", "questions",
                            "revisit"],
                   default="chat")  # fmt: skip
    p.add_argument("--server", choices=["cp_infer", "transformers"], default="cp_infer",
                   help="the server to start (transformers: `transformers serve "
                   "--continuous-batching` on --checkpoint)")  # fmt: skip
    p.add_argument("--preset", default="tiny-llama")
    p.add_argument("--checkpoint", type=Path, help="an HF checkpoint to serve (and its tokenizer)")
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--url", help="an already running server (default: start one)")
    p.add_argument("--model", help="the `model` field of the requests (default: none; the "
                   "checkpoint's path for --server transformers)")  # fmt: skip
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--turns", type=int, default=3, help="chat: turns per client")
    p.add_argument("--requests", type=int, default=16, help="requests: prompts per round")
    p.add_argument("--rounds", type=int, default=1, help="requests: timed rounds (after a warm-up)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--turn-len", type=int, default=32)
    p.add_argument(
        "--system-len",
        type=int,
        default=4096,
        help="shared-prefix: tokens of the system prompt every user sends first",
    )
    p.add_argument(
        "--no-prefix-sharing",
        dest="prefix_sharing",
        action="store_false",
        help="start cp_infer with --no-prefix-sharing (a cold baseline)",
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--text",
        action="store_true",
        help="send text prompts (random ids decoded by --checkpoint's tokenizer)",
    )
    p.add_argument(
        "--ignore-eos", action="store_true",
        help="questions: every answer runs to --max-tokens (the fixed-length run; cp_infer and "
        "vLLM take ignore_eos, transformers serve does not)",
    )  # fmt: skip
    p.add_argument("--peer-threads", type=int, default=2, help="intra-op threads of the peer")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument(
        "--kv-cache-memory", default="1GiB",
        help="the server's KV pool per rank (--kv-cache-memory of serve)",
    )  # fmt: skip
    p.add_argument(
        "--ring-min-tokens", default=None, metavar="N|auto",
        help="the server's --ring-min-tokens (default: serve's, auto): 0 puts every request on "
        "the ring",
    )  # fmt: skip
    p.add_argument(
        "--kv-tier", type=Path, metavar="DIR",
        help="start cp_infer with --kv-tier DIR (emptied first: a cold tier)",
    )  # fmt: skip
    p.add_argument("--kv-tier-size", default="8GiB", help="the server's --kv-tier-size")
    p.add_argument("--vocab", type=int, default=500, help="prompt ids are drawn below this")
    p.add_argument("--log", type=Path, help="the started server's output")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if (args.server == "transformers" or args.text) and args.checkpoint is None:
        p.error("--server transformers and --text need --checkpoint (an HF checkpoint)")
    if args.workload == "questions" and args.checkpoint is None and args.url is None:
        p.error("--workload questions needs a chat model: --checkpoint (a GGUF file or an HF "
                "directory with a chat template)")  # fmt: skip
    if args.ignore_eos and args.server == "transformers":
        p.error("transformers serve has no ignore_eos: run its questions with their EOS")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    extra = ["--max-batch-size", str(args.max_batch_size),
             "--kv-cache-memory", args.kv_cache_memory]  # fmt: skip
    if not args.prefix_sharing:
        extra.append("--no-prefix-sharing")
    if args.ring_min_tokens is not None:
        extra += ["--ring-min-tokens", args.ring_min_tokens]
    if args.kv_tier is not None:
        import shutil

        shutil.rmtree(args.kv_tier, ignore_errors=True)
        extra += ["--kv-tier", str(args.kv_tier), "--kv-tier-size", args.kv_tier_size]
    model = args.model
    if model is None and args.server == "transformers":
        model = str(args.checkpoint)
    proc, url = (None, args.url) if args.url else start_server(
        args.preset, args.cp, extra, args.log, checkpoint=args.checkpoint, server=args.server,
        threads=args.peer_threads,
    )  # fmt: skip
    run = {"chat": lambda: run_chat(url, args), "requests": lambda: run_requests(url, args, model),
           "shared-prefix": lambda: run_shared_prefix(url, args),
           "pressure": lambda: run_pressure(url, args),
           "questions": lambda: run_questions(url, args, model),
           "revisit": lambda: run_revisit(url, args)}[args.workload]  # fmt: skip
    try:
        # the warm-up rounds count too: what the workload timed is told by the requests'
        # own usage; the metrics add what only the server knows
        before = scrape(url)
        results, wall = run()
        after = scrape(url)
    finally:
        stop_server(proc)
    counted = {k[len("cp_infer_") :]: after[k] - before.get(k, 0.0) for k in after
               if k.startswith("cp_infer_")}  # fmt: skip
    summary = summarize(args, results, wall, counted)
    cols = ["server", "workload", "requests", "prompt tok", "prefilled", "tok/s", "hit rate",
            "preempted", "waited", "ring/rank", "TTFT p50/p90/p99 (ms)",
            "ITL p50/p90/p99 (ms)"]  # fmt: skip
    ms = 1000

    def count(key):
        return "-" if summary[key] is None else f"{summary[key]:.0f}"

    row = [summary["server"], args.workload, str(len(results)), str(summary["prompt_tokens"]),
           count("prefilled_tokens"), f"{summary['throughput_tok_s']:.1f}",
           f"{summary['cache_hit_rate']:.3f}", count("preemptions"), count("waits"),
           f"{count('placed_ring')}/{count('placed_rank')}",
           f"{ms * summary['ttft_p50_s']:.0f}/{ms * summary['ttft_p90_s']:.0f}/"
           f"{ms * summary['ttft_p99_s']:.0f}",
           f"{ms * (summary['ttit_p50_s'] or 0):.1f}/{ms * summary['ttit_p90_s']:.1f}/"
           f"{ms * summary['ttit_p99_s']:.1f}"]  # fmt: skip
    if args.workload == "questions":
        cols.append("answer tok min/mean/max")
        row.append(f"{summary['answer_tokens_min']}/{summary['answer_tokens_mean']:.1f}/"
                   f"{summary['answer_tokens_max']}")  # fmt: skip
    if args.workload == "revisit":
        cols += ["TTFT turn 1 / later p50 (ms)", "tier hits"]
        later = summary["later_turn_ttft_p50_s"]
        row += [f"{ms * summary['first_turn_ttft_p50_s']:.0f}/"
                f"{'-' if later is None else f'{ms * later:.0f}'}", count("tier_hits")]  # fmt: skip
    print(format_table(cols, [row]))
    if args.json:
        write_json(args.json, {"summary": summary, "requests": results})
    return summary


if __name__ == "__main__":
    main()
