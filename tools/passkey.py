#!/usr/bin/env python
"""Pass-key retrieval (RULER / LongLoRA style) under any layout, through the engine.

Each trial hides a random 5-digit key at a random depth of a haystack of filler sentences
("The grass is green. The sky is blue. ..." repeated, or the sentences of --filler FILE), asks
"What is the pass key?" and decodes greedily --max-new-tokens tokens; the trial is right when
the generated text contains the key. The haystack is as long as the target length allows: the
whole prompt (chat template, instruction, haystack, question, answer prefix) plus the answer
budget is at most the length, and at most the model's context. Keys, depths and haystacks come
from --haystack-seed alone, so two layouts get the same prompts and can be compared answer for
answer (every trial's generated text is in --json).

With --checkpoint the prompt goes through the tokenizer's chat template (a GGUF file's own
template); with --preset (random weights, no tokenizer) the prompt is plain text whose UTF-8
bytes are the token ids: a random model finds no key, but the answers still compare exactly.

Every rank runs this script (world size = tp * cp * pp); rank 0 prints accuracy per length and
writes --json. A layout of one process also runs without a launcher.

Example (SmolLM2-135M-Instruct, 5 trials at each length, CP=2 with an FP8 KV cache)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 tools/passkey.py \\
        --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --cp 2 --kv-dtype fp8_e4m3 \\
        --lengths 1024 2048 4096 8192 --trials 5 --json passkey_cp2_fp8kv.json
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perplexity import (
    Codec,
    engine_for,
    layout_record,
    model_on_ranks,
    publish,
    run_tool,
    tool_parser,
)

from cp_infer.checkpoint.formats import load_tokenizer
from cp_infer.engine import SamplingConfig
from cp_infer.engine.core import Request
from cp_infer.models.config import ModelConfig
from cp_infer.reporting import format_table

logger = logging.getLogger("cp_infer.tools.passkey")

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"


@dataclass(frozen=True)
class Trial:
    """One prompt: its key, where the key sits (a fraction of the haystack), its tokens."""

    length: int
    index: int
    key: str
    depth: float
    sentences: int  # filler sentences around the needle
    tokens: list[int]


def filler_sentences(spec: str) -> list[str]:
    """``repeat``: the five sentences of :data:`FILLER`; else the sentences of a text file.

    Raises:
        ValueError: the file has no sentences.
    """
    text = FILLER if spec == "repeat" else Path(spec).read_text(encoding="utf-8")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
    if not sentences:
        raise ValueError(f"--filler {spec} has no sentences")
    return sentences


def make_trial(
    length: int, index: int, *, seed: int, sentences: Sequence[str], budget: int,
    render: Callable[[str], list[int]], repeat: bool,
) -> Trial:  # fmt: skip
    """The longest haystack whose rendered prompt has at most ``budget`` tokens.

    ``render`` turns the user's message into the prompt's token ids (template and answer
    prefix included). The key, depth and (for a file) first sentence depend on
    ``(seed, length, index)`` only.

    Raises:
        ValueError: not even an empty haystack fits the budget.
    """
    rng = random.Random(f"passkey/{seed}/{length}/{index}")
    key, depth = str(rng.randint(10000, 99999)), rng.random()
    start = 0 if repeat else rng.randrange(len(sentences))
    needle = NEEDLE.format(key=key)

    def prompt(n: int) -> list[int]:
        hay = [sentences[(start + i) % len(sentences)] for i in range(n)]
        hay.insert(round(depth * n), needle)
        return render(f"{INSTRUCTION}\n\n{' '.join(hay)}\n\n{QUESTION}")

    if len(prompt(0)) > budget:
        raise ValueError(
            f"--lengths {length}: the prompt without filler already has {len(prompt(0))} "
            f"tokens, more than the {budget} the length leaves; use a larger length"
        )
    lo, hi = 0, 1  # prompt(lo) fits; grow hi until it does not, then bisect
    while len(prompt(hi)) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(prompt(mid)) <= budget else (lo, mid)
    return Trial(length, index, key, depth, lo, prompt(lo))


def prompt_renderer(args, codec: Codec) -> Callable[[str], list[int]]:
    """The user's message -> prompt tokens: the chat template (when the checkpoint has one and
    --no-chat-template is not given), then the answer prefix."""
    template = None
    if not codec.bytes_as_tokens and not args.no_chat_template:
        hf = load_tokenizer(args.checkpoint, transformers=True)
        template = hf if hf.chat_template is not None else None
    if template is None:
        return lambda message: codec.encode(f"{message} {args.answer_prefix}".rstrip())

    def render(message: str) -> list[int]:
        chat = [{"role": "user", "content": message}]
        text = template.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return codec.encode(text + args.answer_prefix)

    return render


def _prepare(args):
    def prepare(cfg: ModelConfig, codec: Codec) -> list[Trial]:
        if args.trials < 1 or args.max_new_tokens < 1:
            raise ValueError("--trials and --max-new-tokens must be >= 1")
        too_long = [n for n in args.lengths if n > cfg.max_seq_len]
        if too_long:
            raise ValueError(f"--lengths {too_long} exceed the model's context "
                             f"({cfg.max_seq_len} tokens): use lengths up to it")  # fmt: skip
        render = prompt_renderer(args, codec)
        sentences = filler_sentences(args.filler)
        return [
            make_trial(n, i, seed=args.haystack_seed, sentences=sentences, render=render,
                       budget=n - args.max_new_tokens, repeat=args.filler == "repeat")
            for n in args.lengths
            for i in range(args.trials)
        ]  # fmt: skip

    return prepare


def _run(args, argv: list[str]) -> int:
    with model_on_ranks(args, argv, _prepare(args)) as (pg, model, cfg, eos, codec, trials):
        batch = min(args.batch, args.trials)
        engine = engine_for(args, model, pg, [max(args.lengths)] * batch)
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, eos_id=eos)
        rids = itertools.count()
        results, per_length = [], []
        for length in args.lengths:
            mine = [t for t in trials if t.length == length]
            dist.barrier()
            t0 = time.perf_counter()
            outcomes, _ = engine.run([Request(next(rids), tuple(t.tokens), sampling) for t in mine])
            seconds = time.perf_counter() - t0
            for t, o in zip(mine, outcomes, strict=True):
                text = codec.decode(o.tokens)
                trial = {k: v for k, v in asdict(t).items() if k != "tokens"}
                results.append({**trial, "prompt_tokens": len(t.tokens), "generated_ids": o.tokens,
                                "generated_text": text, "correct": t.key in text})  # fmt: skip
            right = sum(r["correct"] for r in results[-len(mine) :])
            per_length.append({
                "length": length, "trials": len(mine), "correct": right,
                "accuracy": right / len(mine), "seconds": seconds,
                "prompt_tokens_mean": sum(len(t.tokens) for t in mine) / len(mine),
            })  # fmt: skip
            logger.info("length %d: %d/%d right (%.1f s)", length, right, len(mine), seconds)
    record = {
        **layout_record(args, cfg), "filler": args.filler, "haystack_seed": args.haystack_seed,
        "chat_template": not codec.bytes_as_tokens and not args.no_chat_template,
        "answer_prefix": args.answer_prefix, "max_new_tokens": args.max_new_tokens,
        "accuracy": sum(r["correct"] for r in results) / len(results),
        "seconds": sum(r["seconds"] for r in per_length), "lengths": per_length,
        "trials": results,
    }  # fmt: skip
    rows = [[str(r["length"]), f"{r['prompt_tokens_mean']:.0f}", f"{r['correct']}/{r['trials']}",
             f"{r['accuracy']:.2f}", f"{r['seconds']:.1f}"] for r in per_length]  # fmt: skip
    table = format_table(["length", "prompt tokens", "right", "accuracy", "seconds"], rows)
    publish(args, record, f"{record['layout']}\n{table}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = tool_parser(__doc__)
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], metavar="N",
        help="target lengths in tokens: prompt + answer budget, at most the model's context",
    )  # fmt: skip
    p.add_argument("--trials", type=int, default=5, help="prompts per length")
    p.add_argument("--max-new-tokens", type=int, default=8, help="the answer's budget (greedy)")
    p.add_argument(
        "--filler", default="repeat", metavar="repeat|FILE",
        help="the haystack: the five grass/sky/sun sentences repeated, or the sentences of a "
        "text file (e.g. tests/data/real_text.txt) from a random one on",
    )  # fmt: skip
    p.add_argument("--haystack-seed", type=int, default=0, help="seeds keys, depths, haystacks")
    p.add_argument(
        "--answer-prefix", default="The pass key is",
        help="text the answer starts with (after the chat template's assistant turn)",
    )  # fmt: skip
    p.add_argument(
        "--no-chat-template", action="store_true",
        help="a plain prompt even when the checkpoint has a chat template",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=int, default=4, metavar="B",
        help="trials run together (each rank's KV pool holds B of the longest length)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    return run_tool(_run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
