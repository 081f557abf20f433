"""Command line: ``python -m cp_infer generate ...`` (run it under torchrun or deepspeed).

Examples::

    # a random tiny Llama at CP=2 on CPU
    torchrun --standalone --nproc-per-node 2 -m cp_infer generate --preset tiny-llama --seed 0 \\
        --cp 2 --input prompts.jsonl --output out.jsonl --max-new-tokens 16

    # a Hugging Face checkpoint at TP=2 x CP=2
    torchrun --standalone --nproc-per-node 4 -m cp_infer generate --checkpoint ./llama \\
        --tp 2 --cp 2 --input prompts.jsonl --output out.jsonl --save-logits logits.safetensors

Input lines are ``{"id": ..., "token_ids": [...]}`` or ``{"id": ..., "prompt": "text"}`` (text
needs a tokenizer.json in the checkpoint directory). Output lines are
``{"id": ..., "token_ids": [...], "text": ...}``. A multi-turn chat is
``{"id": ..., "turns": [[...], [...]]}``: each turn is prefilled over the KV cache of the earlier
ones (persistent-KV prefill) and the output line holds ``"turns": [{"token_ids", "text"}, ...]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from cp_infer.attention import VARIANTS
from cp_infer.attention.kernels import KERNELS, get_kernel
from cp_infer.distributed import on_all_ranks
from cp_infer.log import setup_logging
from cp_infer.models.config import PRESETS, ModelConfig, get_preset
from cp_infer.reporting import atomic_write

__all__ = ["main"]

logger = logging.getLogger("cp_infer")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cp_infer",
        description="Exact context-parallel (ring attention) inference for long contexts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate",
        help="generate tokens for a JSONL file of prompts",
        description="Prefill every prompt with ring attention over the CP ranks, then decode. "
        "Launch one process per rank: world size = tp * cp * pp (x dp replicas, which run "
        "the same batch; use them with --ep to spread experts further).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", type=Path, help="Hugging Face directory (config.json + *.safetensors)"
    )
    src.add_argument("--preset", choices=sorted(PRESETS), help="random-initialized preset model")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the preset's weights and of sampling"
    )
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--cp", type=int, default=1, help="context-parallel size (ring attention)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    g.add_argument("--input", type=Path, required=True, help="prompts, one JSON object per line")
    g.add_argument("--output", type=Path, required=True, help="where to write the generations")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument(
        "--eos-id", type=int, nargs="+", default=None,
        help="stop token(s) (default: eos_token_id of config.json, all of them if a list)",
    )  # fmt: skip
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument(
        "--variant", choices=[*VARIANTS, "auto"], default="auto",
        help="prefill ring variant; auto picks per turn by the paper's Alg. 1 (for GQA models: "
        "pass-KV unless most of the context is cached)",
    )  # fmt: skip
    g.add_argument("--kernel", choices=["auto", *sorted(KERNELS)], default="auto")
    g.add_argument(
        "--save-logits", type=Path, help="safetensors of each prompt's first-token logits"
    )
    g.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def read_prompts(
    path: Path, checkpoint: Path | None
) -> tuple[list, list[list[list[int]]], object, bool]:
    """(ids, turns of token ids per row, tokenizer or None, multi_turn) from a JSONL file.

    A row is ``{"id", "token_ids": [...]}``, ``{"id", "prompt": "text"}``, or a conversation
    ``{"id", "turns": [[...] or "text", ...]}``; conversations in one file must have the same
    number of turns (they run as one batch, turn by turn).
    """
    if not path.exists():
        raise ValueError(f"input file {path} does not exist")
    ids, rows, state = [], [], {"tokenizer": None}

    def encode(item, where: str) -> list[int]:
        if isinstance(item, str):
            state["tokenizer"] = state["tokenizer"] or load_tokenizer(checkpoint)
            return state["tokenizer"].encode(item).ids
        if isinstance(item, list):
            return [int(t) for t in item]
        raise ValueError(f"{where}: a prompt is a list of token ids or a string")

    multi_turn = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
        if "turns" in row:
            multi_turn = True
            rows.append([encode(t, f"{path}:{n}") for t in row["turns"]])
        elif "token_ids" in row:
            rows.append([encode(row["token_ids"], f"{path}:{n}")])
        elif "prompt" in row:
            rows.append([encode(row["prompt"], f"{path}:{n}")])
        else:
            raise ValueError(f'{path}:{n} needs "token_ids", "prompt" or "turns"')
        ids.append(row.get("id", len(ids)))
    dupes = sorted({str(i) for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(
            f"{path}: ids {dupes[:5]} appear more than once; give every line its own id"
        )
    if len({len(r) for r in rows}) > 1:
        raise ValueError(
            f"{path}: conversations have {sorted({len(r) for r in rows})} turns; put "
            "conversations with different numbers of turns in separate files"
        )
    tokenizer = state["tokenizer"]
    if tokenizer is None and checkpoint is not None and (checkpoint / "tokenizer.json").exists():
        tokenizer = load_tokenizer(checkpoint)
    return ids, rows, tokenizer, multi_turn


def load_tokenizer(checkpoint: Path | None):
    if checkpoint is None or not (checkpoint / "tokenizer.json").exists():
        raise ValueError(
            'text prompts ("prompt") need a tokenizer.json in --checkpoint; '
            'give "token_ids" instead'
        )
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ValueError(
            "text prompts need the `tokenizers` package: pip install tokenizers"
        ) from e
    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


def _model_config(args) -> tuple[ModelConfig, int | tuple[int, ...] | None]:
    if args.preset:
        return get_preset(args.preset), tuple(args.eos_id) if args.eos_id else None
    if not (args.checkpoint / "config.json").exists():
        raise ValueError(
            f"{args.checkpoint} has no config.json: is it a Hugging Face model directory?"
        )
    hf = json.loads((args.checkpoint / "config.json").read_text())
    eos = tuple(args.eos_id) if args.eos_id is not None else hf.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else eos  # instruct models list several
    return ModelConfig.from_hf(hf), eos


def run_generate(args) -> int:
    from cp_infer.checkpoint import RandomSource, SafetensorsSource, load_weights
    from cp_infer.engine import Conversation, SamplingConfig, generate
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    get_kernel(args.kernel)  # a backend missing on this machine fails here, before any work
    cfg, eos_id = _model_config(args)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=eos_id,
    )
    ids, rows, tokenizer, multi_turn = read_prompts(args.input, args.checkpoint)
    for pid, turns in zip(ids, rows, strict=True):  # fail before the first turn, not the last
        total = sum(len(t) for t in turns) + len(turns) * args.max_new_tokens
        if len(turns) > 1 and total > cfg.max_seq_len:
            raise ValueError(
                f"conversation {pid!r} needs up to {total} tokens over its {len(turns)} turns, "
                f"more than the model's max_seq_len={cfg.max_seq_len}; lower --max-new-tokens "
                "or shorten the conversation"
            )
    dtype = DTYPES[args.dtype]
    with parallel_groups(
        tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep, timeout_s=args.timeout
    ) as pg:
        if pg.dp > 1:
            logger.info(
                "world size %d = tp*cp*pp x %d: the %d data-parallel replicas run the same batch "
                "(they form the EP groups)", pg.world_size, pg.dp, pg.dp,
            )  # fmt: skip
        logger.info("%s | model %s (%.1fM params)", pg.describe(), cfg.name, cfg.n_params() / 1e6)
        model = parallelize(cfg, pg, dtype)

        def load() -> None:
            source = RandomSource(args.seed) if args.preset else SafetensorsSource(args.checkpoint)
            load_weights(model, source, cfg, progress=pg.rank == 0)

        # each stage reads different tensors: agree on failure before any collective
        on_all_ranks(load)
        conversation = Conversation()
        results = [
            generate(
                model, pg, [r[turn] for r in rows], sampling,
                variant=args.variant, kernel=args.kernel, conversation=conversation,
            )
            for turn in range(len(rows[0]) if rows else 1)
        ]  # fmt: skip
        writer = pg.is_last_pp_stage and pg.tp_rank == 0 and pg.cp_rank == 0 and pg.dp_rank == 0
        if writer:
            # the writer may not be rank 0 (with PP it sits on the last stage): let it report
            logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
            _write_outputs(args, ids, results, tokenizer, multi_turn)
        torch.distributed.barrier()
    return 0


def _write_outputs(args, ids, results, tokenizer, multi_turn: bool) -> None:
    def entry(toks: list[int]) -> dict:
        text = tokenizer.decode(toks) if tokenizer is not None else None
        return {"token_ids": toks, "text": text}

    def write_jsonl(tmp: Path) -> None:
        with tmp.open("w") as f:
            for i, pid in enumerate(ids):
                if multi_turn:
                    row = {"id": pid, "turns": [entry(r.tokens[i]) for r in results]}
                else:
                    row = {"id": pid, **entry(results[0].tokens[i])}
                f.write(json.dumps(row) + "\n")

    atomic_write(args.output, write_jsonl)
    logger.info("wrote %d generations to %s", len(ids), args.output)
    for i, pid in enumerate(ids):
        logger.info(
            "id=%s generated %s",
            pid,
            [r.tokens[i] for r in results] if multi_turn else results[0].tokens[i],
        )
    if args.save_logits is not None:
        from safetensors.torch import save_file

        tensors = {}
        for turn, r in enumerate(results):
            for i, pid in enumerate(ids):
                key = f"{pid}/{turn}" if multi_turn else str(pid)
                tensors[key] = r.first_logits[i].contiguous()
        atomic_write(args.save_logits, lambda tmp: save_file(tensors, str(tmp)))
        logger.info("wrote first-token logits to %s", args.save_logits)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "generate":
            return run_generate(args)
    except (ValueError, ImportError) as e:
        # Bad input or a backend missing here (e.g. --kernel flash_attn on CPU): the same
        # message on every rank, and a non-zero exit so torchrun stops.
        logger.error("error: %s", e)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
