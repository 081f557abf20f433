"""Score continuations against a running ``cp_infer serve``, as evaluation harnesses do.

For each line ``{"id": ..., "context": ..., "continuation": ...}`` (token ids, or text when
the server has a tokenizer) it asks the server for the log-probability of the continuation
given the context: one completion with ``echo: true, logprobs: 1, max_tokens: 0``, the
continuation's tokens picked out of the echoed prompt. It prints one JSON line per input:
the continuation's summed log-probability, its token count, and whether greedy decoding would
have produced it (every token the most likely one). That is lm-evaluation-harness's
``loglikelihood`` request, and the context can be as long as the server's CP ranks hold.

    torchrun --standalone --nproc-per-node 2 -m cp_infer serve --preset tiny-llama --cp 2 &
    python examples/score_continuations.py --url http://127.0.0.1:8000 --input pairs.jsonl

With text, the continuation's tokens are those whose ``text_offset`` falls at or after the
context's end, so the context should end where a token does (end it before a space).
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx


def score(client: httpx.Client, context, continuation) -> dict:
    """Log-probability of ``continuation`` after ``context`` (both token ids, or both text)."""
    ids = isinstance(context, list)
    prompt = context + continuation
    r = client.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0},
    )
    if r.status_code != 200:
        raise SystemExit(f"the server answered {r.status_code}: {r.text}")
    lp = r.json()["choices"][0]["logprobs"]
    if ids:
        start = len(context)
    else:  # the first token that begins at or after the context's end
        start = next(i for i, off in enumerate(lp["text_offset"]) if off >= len(context))
    if start == 0:
        raise SystemExit("the context must be at least one token: nothing predicts the first")
    chosen = lp["token_logprobs"][start:]
    tops = lp["top_logprobs"][start:]
    greedy = all(c >= max(top.values()) for c, top in zip(chosen, tops, strict=True))
    return {"logprob": sum(chosen), "tokens": len(chosen), "is_greedy": greedy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--input", required=True, help="JSON lines: id, context, continuation")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    args = p.parse_args(argv)
    with open(args.input) as f, httpx.Client(base_url=args.url, timeout=args.timeout) as client:
        for line in f:
            if line.strip():
                item = json.loads(line)
                result = score(client, item["context"], item["continuation"])
                print(json.dumps({"id": item.get("id"), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
