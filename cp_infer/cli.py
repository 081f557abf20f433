"""Command line: ``python -m cp_infer COMMAND ...``; each command lives in cp_infer.entrypoints.

Examples:

    # a random tiny Llama at CP=2 on CPU
    torchrun --standalone --nproc-per-node 2 -m cp_infer generate --preset tiny-llama --seed 0 \\
        --cp 2 --input prompts.jsonl --output out.jsonl --max-new-tokens 16

    # a Hugging Face checkpoint at TP=2 x CP=2 (or a megatron-core torch_dist one)
    torchrun --standalone --nproc-per-node 4 -m cp_infer generate --checkpoint ./llama \\
        --tp 2 --cp 2 --input prompts.jsonl --output out.jsonl --save-logits logits.safetensors

    # convert a checkpoint to megatron-core's distributed format and back
    python -m cp_infer convert --from hf --to megatron --input ./llama --output ./llama-mcore

`python -m cp_infer COMMAND --help` describes each command and every option.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch.distributed as dist

from cp_infer.distributed import clear_failure, report_failure
from cp_infer.entrypoints import calibrate, convert, generate, plan, plan_memory, serve
from cp_infer.entrypoints.launch import HelpFormatter
from cp_infer.log import setup_logging

__all__ = ["build_parser", "main"]

logger = logging.getLogger("cp_infer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cp_infer",
        description="Exact context-parallel (ring attention) inference for long contexts.",
        formatter_class=HelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    # DeepSpeed's launcher passes --local_rank=N before the command (unless --no_local_rank)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.add_parser(sub)
    serve.add_parser(sub)
    plan_memory.add_parser(sub)
    plan.add_parser(sub)
    calibrate.add_parser(sub)
    convert.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command; 0 on success, 1 (on every rank, with the same message) on failure."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:  # launchers also set LOCAL_RANK; keep the two in step
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    setup_logging()
    if dist.is_initialized():  # a process that runs several commands (tests): forget the last
        if dist.get_rank() == 0:
            clear_failure()
        dist.barrier()
    try:
        return args.run(args, argv)
    except Exception as e:
        return report_failure(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
