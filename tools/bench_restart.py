#!/usr/bin/env python
"""What a rank's death costs a streaming client: the time from SIGKILL to its next token.

A server (``cp_infer serve`` under torchrun, one thread per rank) streams greedy answers to fresh
prompts of each ``--prompt-tokens``; after ``--kill-after`` tokens this tool kills rank
``--rank``'s engine (SIGKILL). Every rank's engine restarts and the stream resumes from its
prompt and the tokens it got (docs/serving.md). Per prompt length, the table gives the medians of:

- ``gap``: from the kill to the stream's next token, what the client waits;
- ``down``: from the death to the restarted engine connecting to the API process (the server's
  ``cp_infer_engine_restart_seconds``): the keepers noticing it, the engines forked again, the
  weights loaded, the process groups formed;
- ``start``: of that, the engine's own start, fork to loaded (rank 0's log);
- ``resume``: ``gap - down``: the request's prompt and tokens prefilled again, its next token;
- ``ttft``: a lone fresh prompt of the same length on the same server, for scale;

and whether every resumed stream equals the same prompt's undisturbed answer.

Example (the figures in docs/performance.md)::

    python examples/make_tiny_checkpoint.py --preset small-llama --output /tmp/small-hf
    python tools/bench_restart.py --checkpoint /tmp/small-hf --cp 2 \\
        --prompt-tokens 512 4096 --json bench_out/restart.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import scrape, start_server, stop_server

from cp_infer.checkpoint.formats import detect_format, read_config
from cp_infer.models import get_preset
from cp_infer.reporting import format_table, write_json
from cp_infer.testing.processes import engine_pids

logger = logging.getLogger("bench_restart")


def stream(url: str, prompt: list[int], max_tokens: int, kill=None) -> tuple[list, list, float]:
    """A greedy stream: its tokens, when each came (monotonic), and when ``kill()`` ran (after
    the token it was given the count of; ``kill=(n, fn)``), or nan."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    tokens, times, killed = [], [], float("nan")
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for t in event["choices"][0].get("token_ids") or []:
                tokens.append(t)
                times.append(time.monotonic())
                if kill is not None and len(tokens) == kill[0]:
                    kill[1]()
                    killed = time.monotonic()
    return tokens, times, killed


def _engine_starts(log: Path) -> list[float]:
    pattern = r"\[rank 0/\d+\] cp_infer: engine generation \d+ ready: ([\d.]+)s"
    return [float(x) for x in re.findall(pattern, log.read_text())]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="random weights of this preset")
    src.add_argument("--checkpoint", type=Path, help="a checkpoint directory or GGUF file")
    p.add_argument("--cp", type=int, default=2, help="CP ranks (processes)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 4096], metavar="N")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per stream")
    p.add_argument("--kill-after", type=int, default=16, metavar="N",
                   help="kill the engine once the stream has N tokens")  # fmt: skip
    p.add_argument("--rank", type=int, default=1, help="whose engine is killed")
    p.add_argument("--repeats", type=int, default=3, help="kills per prompt length")
    p.add_argument("--seed", type=int, default=0, help="the prompts' seed")
    p.add_argument(
        "--log",
        type=Path,
        default=Path("bench_out/restart_server.log"),
        help="the server's log (the engines' start times are read from it)",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 < args.kill_after < args.max_tokens:
        p.error("--kill-after must be in (0, --max-tokens)")
    vocab = (
        get_preset(args.preset)
        if args.preset
        else read_config(args.checkpoint, detect_format(args.checkpoint))[0]
    ).vocab_size
    rng = random.Random(args.seed)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--max-restarts", str(len(args.prompt_tokens) * args.repeats)]
    proc, url = start_server(args.preset, args.cp, extra, args.log, checkpoint=args.checkpoint)
    port = int(url.rsplit(":", 1)[1])
    rows, records = [], []
    try:
        stream(url, [rng.randrange(1, vocab) for _ in range(16)], 2)  # warm up
        for n in args.prompt_tokens:
            runs = []
            for _ in range(args.repeats):
                prompt = [rng.randrange(1, vocab) for _ in range(n)]
                before = scrape(url)
                pid = engine_pids(port)[args.rank]
                tokens, times, killed = stream(
                    url, prompt, args.max_tokens,
                    (args.kill_after, lambda pid=pid: os.kill(pid, signal.SIGKILL)),
                )  # fmt: skip
                after = scrape(url)
                gap = times[args.kill_after] - killed
                down = (after["cp_infer_engine_restart_seconds_sum"]
                        - before.get("cp_infer_engine_restart_seconds_sum", 0.0))  # fmt: skip
                again, _, _ = stream(url, prompt, args.max_tokens)  # undisturbed (cached now)
                fresh = [rng.randrange(1, vocab) for _ in range(n)]
                t0 = time.monotonic()
                _, ftimes, _ = stream(url, fresh, 1)
                runs.append({"gap_s": gap, "down_s": down, "resume_s": gap - down,
                             "exact": tokens == again, "ttft_s": ftimes[0] - t0})  # fmt: skip
                logger.info("%d tokens: gap %.2fs, down %.2fs, exact %s", n, gap, down,
                            tokens == again)  # fmt: skip
            starts = _engine_starts(args.log)[-args.repeats :]
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("gap_s", "down_s", "resume_s", "ttft_s")}  # fmt: skip
            med["start_s"] = statistics.median(starts) if starts else float("nan")
            exact = all(r["exact"] for r in runs)
            records.append({"prompt_tokens": n, **med, "exact": exact, "runs": runs})
            rows.append([str(n), f"{med['gap_s']:.2f}", f"{med['down_s']:.2f}",
                         f"{med['start_s']:.2f}", f"{med['resume_s']:.2f}",
                         f"{med['ttft_s']:.2f}", "yes" if exact else "NO"])  # fmt: skip
    finally:
        stop_server(proc)
    print(format_table(["prompt", "gap s", "down s", "start s", "resume s", "ttft s", "exact"],
                       rows))  # fmt: skip
    result = {"cp": args.cp, "rank": args.rank, "kill_after": args.kill_after,
              "max_tokens": args.max_tokens, "model": args.preset or str(args.checkpoint),
              "results": records}  # fmt: skip
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
