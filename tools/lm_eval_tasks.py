#!/usr/bin/env python
"""Two local lm-evaluation-harness tasks that the trained SmolLM2-135M-Instruct does well above
chance: one-digit additions, generated from --seed alone (no download), each question once.

- ``cp_infer_add_mc`` (``multiple_choice``, scored by log-likelihood, so for ``hf`` and
  ``local-completions``): ``Question: What is 7 + 5?\\nAnswer:`` with the sum and three near
  misses as choices (chance: 25%), after three worked examples in the prompt.
- ``cp_infer_add_gen`` (``generate_until``, greedy, so also for ``local-chat-completions``,
  which cannot score a prompt): ``What is 7 + 5?``; the worked examples answer ``2 + 3 = 5``
  (with ``--apply_chat_template`` they are earlier turns of the chat); the last number of the
  answer's first line must be the sum (``exact_match``).

Both read one JSON Lines file (lm-eval's ``dataset_path: json``, ``data_files``). Example::

    python tools/lm_eval_tasks.py --out lm_eval_tasks
    lm_eval --model hf --model_args pretrained=SMOLLM2_HF_DIR,dtype=float32 --device cpu \\
        --batch_size 1 --include_path lm_eval_tasks --tasks cp_infer_add_mc
    lm_eval --model local-chat-completions --apply_chat_template \\
        --model_args model=smollm2,base_url=http://127.0.0.1:8000/v1/chat/completions \\
        --include_path lm_eval_tasks --tasks cp_infer_add_gen

(docs/serving.md, "lm-eval on a trained model", has every command and the accuracies.)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import yaml

MC_TASK = "cp_infer_add_mc"
GEN_TASK = "cp_infer_add_gen"
DATA = "additions.jsonl"
SHOTS = ((2, 3), (4, 4), (6, 1))  # the worked examples, never asked
# a near miss is the sum moved by one of these
MISSES = (-3, -2, -1, 1, 2, 3)
MAX_DOCS = 81 - len(SHOTS)


def doc(a: int, b: int, rng: random.Random) -> dict:
    """One question: ``a + b``, its sum, and the sum among three near misses (``label``: its
    index)."""
    answer = a + b
    misses = rng.sample([answer + d for d in MISSES if answer + d > 0], 3)
    choices = [str(c) for c in rng.sample([answer, *misses], 4)]
    return {"a": a, "b": b, "answer": str(answer), "choices": choices,
            "label": choices.index(str(answer))}  # fmt: skip


def make_docs(n: int, seed: int) -> list[dict]:
    """``n`` distinct additions of one-digit numbers (1-9), none a worked example; fewer are the
    first of more (``make_docs(20, s) == make_docs(50, s)[:20]``)."""
    if not 1 <= n <= MAX_DOCS:
        raise ValueError(f"docs={n}: there are {MAX_DOCS} distinct questions; use 1 to {MAX_DOCS}")
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10) if (a, b) not in SHOTS]
    rng.shuffle(pairs)
    return [doc(a, b, rng) for a, b in pairs[:n]]


def task_configs(data: Path) -> dict[str, dict]:
    """The two tasks' lm-eval configurations, by name, over the JSON Lines file ``data``."""
    shots = [doc(a, b, random.Random(0)) for a, b in SHOTS]
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "num_fewshot": len(SHOTS),
    }
    mc = {
        "task": MC_TASK,
        **common,
        "fewshot_config": {"sampler": "first_n", "samples": shots},
        "output_type": "multiple_choice",
        "doc_to_text": "Question: What is {{a}} + {{b}}?\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    gen = {
        "task": GEN_TASK,
        **common,
        # the examples answer with the whole equation, which the model then writes too
        "fewshot_config": {
            "sampler": "first_n",
            "samples": shots,
            "doc_to_target": "{{a}} + {{b}} = {{answer}}",
        },
        "output_type": "generate_until",
        "doc_to_text": "What is {{a}} + {{b}}?",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {
            "until": ["\n"],
            "max_gen_toks": 16,
            "do_sample": False,
            "temperature": 0.0,
        },
        "filter_list": [
            {
                "name": "last_number",
                "filter": [
                    {"function": "regex", "regex_pattern": r"(-?\d+)", "group_select": -1},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    return {MC_TASK: mc, GEN_TASK: gen}


def write_tasks(out: Path, *, docs: int = 50, seed: int = 0) -> list[str]:
    """Write the dataset and one YAML per task into ``out``; the task names."""
    rows = make_docs(docs, seed)
    out.mkdir(parents=True, exist_ok=True)
    data = out / DATA
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = task_configs(data)
    for name, config in configs.items():
        (out / f"{name}.yaml").write_text(
            yaml.safe_dump(config, sort_keys=False, width=100, default_flow_style=None)
        )
    return list(configs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run with lm_eval --include_path OUT --tasks cp_infer_add_mc (or cp_infer_add_gen).",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the YAMLs and JSONL")
    p.add_argument("--docs", type=int, default=50, help=f"questions (1-{MAX_DOCS}; default 50)")
    p.add_argument("--seed", type=int, default=0, help="decides the questions (default 0)")
    args = p.parse_args(argv)
    try:
        names = write_tasks(args.out, docs=args.docs, seed=args.seed)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {args.docs} questions to {args.out / DATA} and tasks {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
