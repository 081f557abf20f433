#!/usr/bin/env python
"""Perplexity of a text file under any layout (TP x CP x PP), scored by the engine.

The text is tokenized (the checkpoint's tokenizer; with --preset, which has none, its UTF-8
bytes are the token ids) and cut from its start into --windows non-overlapping windows of
--context tokens. Each window is one request to the engine core that ``generate`` and ``serve``
drive, asking for prompt log-probabilities: the window is prefilled with ring attention over the
CP ranks and the engine returns log p(token[i+1] | token[:i+1]) at every position, so a window
of N tokens scores N-1 of them (its first has no context). NLL per token is the mean over all
windows' scored tokens; perplexity is its exp. The model's flags are generate's (--dtype,
--kv-dtype, --quant, ...), so one command line compares any layout or precision with another.

Every rank runs this script (world size = tp * cp * pp); rank 0 prints a table and writes
--json. A layout of one process also runs without a launcher. A window and the one token the
engine samples after it must fit the model's context: with SmolLM2 (8192) that is
--context 8191 at most.

Example (SmolLM2-135M-Instruct at CP=2, then at CP=1: the two NLLs agree to ~1e-6)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 tools/perplexity.py \\
        --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --cp 2 --text tests/data/real_text.txt \\
        --context 4096 --windows 2 --json ppl_cp2.json
    OMP_NUM_THREADS=1 python tools/perplexity.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text tests/data/real_text.txt --context 4096 --windows 2 --json ppl_cp1.json
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.attention import VARIANTS
from cp_infer.attention.kernels import get_kernel
from cp_infer.checkpoint.formats import has_tokenizer, load_tokenizer
from cp_infer.distributed import RankFailure, on_all_ranks
from cp_infer.engine import SamplingConfig
from cp_infer.engine.core import EngineCore, Request
from cp_infer.engine.offline import new_engine, pool_tokens
from cp_infer.entrypoints.bootstrap import (
    add_model_arguments,
    build_model,
    hardware_profile,
    model_config,
    start_ranks,
)
from cp_infer.entrypoints.launch import HelpFormatter, add_common_arguments, processes_needed
from cp_infer.log import setup_logging
from cp_infer.models.config import ModelConfig
from cp_infer.parallel import check_model_fits_layout
from cp_infer.reporting import check_writable, format_table, write_json
from parallel_state import ParallelGroups, parallel_groups, validate_parallel_sizes

logger = logging.getLogger("cp_infer.tools.perplexity")


# -- shared with tools/passkey.py: the model on every rank, its tokenizer, an engine ---------------
def tool_parser(doc: str) -> argparse.ArgumentParser:
    """generate's model and layout flags, --variant, --json and --debug, with ``doc`` as help."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )  # fmt: skip
    add_model_arguments(p)
    p.add_argument(
        "--variant", choices=[*VARIANTS, "auto"], default="auto",
        help="prefill ring variant (auto: the one the hardware model predicts faster)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results here (rank 0)")
    add_common_arguments(p)
    return p


@dataclass(frozen=True)
class Codec:
    """Text to token ids and back: the checkpoint's tokenizer, or UTF-8 bytes for a preset."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    bytes_as_tokens: bool


def text_codec(args) -> Codec:
    """The checkpoint's tokenizer (no special tokens added), or bytes with ``--preset``.

    Raises:
        ValueError: the checkpoint has no tokenizer.
    """
    if args.preset:
        return Codec(
            encode=lambda text: list(text.encode()),
            decode=lambda ids: bytes(t for t in ids if t < 256).decode(errors="replace"),
            bytes_as_tokens=True,
        )
    if not has_tokenizer(args.checkpoint):
        raise ValueError(f"{args.checkpoint} has no tokenizer to turn the text into tokens")
    tok = load_tokenizer(args.checkpoint)
    return Codec(
        encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        bytes_as_tokens=False,
    )


def layout_name(args) -> str:
    """``tp=1 cp=2 pp=1`` plus whatever departs from fp32: ``dtype=bfloat16 kv=fp8_e4m3 fp8``."""
    name = f"tp={args.tp} cp={args.cp} pp={args.pp}"
    if args.ep > 1:
        name += f" ep={args.ep}"
    if args.dtype != "float32":
        name += f" dtype={args.dtype}"
    if args.kv_dtype != "auto":
        name += f" kv={args.kv_dtype}"
    if args.quant != "none":
        name += f" {args.quant}:{'+'.join(args.fp8_layers)}"
    return name


def layout_record(args, cfg: ModelConfig) -> dict:
    """The model and layout fields every JSON record starts with."""
    return {
        "model": cfg.name, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "preset": args.preset, "layout": layout_name(args), "tp": args.tp, "cp": args.cp,
        "pp": args.pp, "ep": args.ep, "dtype": args.dtype, "kv_dtype": args.kv_dtype,
        "quant": args.quant, "fp8_layers": list(args.fp8_layers) if args.quant != "none" else [],
        "variant": args.variant, "world_size": dist.get_world_size(),
    }  # fmt: skip


def _check_launch(args, argv: Sequence[str]) -> None:
    """Without a launcher a layout of one process runs here; a larger one is told the command
    (generate's own message names ``-m cp_infer``, not this script)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    try:
        n = processes_needed(tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep)
    except ValueError as e:
        raise RankFailure(str(e)) from e
    if n > 1:
        raise RankFailure(
            f"tp={args.tp} cp={args.cp} pp={args.pp} needs {n} processes: launch with "
            f"`OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node {n} {sys.argv[0]} "
            f"{shlex.join(argv)}`"
        )


@contextlib.contextmanager
def model_on_ranks(
    args, argv: Sequence[str], prepare: Callable[[ModelConfig, Codec], object]
) -> Iterator[tuple[ParallelGroups, torch.nn.Module, ModelConfig, object, Codec, object]]:
    """Join the ranks, check everything that needs no weights (the layout, the model, the
    output path and the tool's own ``prepare(cfg, codec)``, whose result is yielded), then
    build this rank's shard of the model as ``generate`` does.

    Yields:
        (groups, model, config, EOS ids, codec, what ``prepare`` returned).

    Raises:
        RankFailure: on every rank alike, with the first problem found.
    """
    _check_launch(args, argv)
    device = start_ranks(args, list(argv))

    def check():
        sizes = validate_parallel_sizes(
            dist.get_world_size(), tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep
        )
        get_kernel(args.kernel, device)
        hardware_profile(args.hardware)
        cfg, eos, fmt = model_config(args)
        check_model_fits_layout(cfg, sizes)
        if args.json is not None and dist.get_rank() == 0:
            check_writable(args.json, "--json")
        codec = text_codec(args)
        return cfg, eos, fmt, codec, prepare(cfg, codec)

    cfg, eos, fmt, codec, job = on_all_ranks(check)
    with parallel_groups(
        tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep, timeout_s=args.timeout
    ) as pg:
        logger.info("%s | model %s (%.1fM params)", pg.describe(), cfg.name, cfg.n_params() / 1e6)
        model = on_all_ranks(lambda: build_model(args, cfg, fmt, pg, device))
        yield pg, model, cfg, eos, codec, job


def engine_for(args, model, pg: ParallelGroups, lengths: Sequence[int]) -> EngineCore:
    """An engine whose KV pool holds sequences of ``lengths`` tokens at once, all admitted
    together (``len(lengths)`` is the batch)."""
    engine = new_engine(
        model, pg, kv_tokens=pool_tokens(lengths, pg.cp), max_batch=len(lengths),
        kernel=args.kernel, exchange=args.decode_exchange,
        hardware=hardware_profile(args.hardware), timeout_s=args.timeout,
        kv_dtype=args.kv_dtype,
    )  # fmt: skip
    engine.configure(variant=args.variant, prefill_chunk=None, progress=False)
    return engine


def publish(args, record: dict, table: str) -> None:
    """Rank 0 prints ``table`` and writes ``record`` to ``--json``."""
    if dist.get_rank() != 0:
        return
    print(table)
    if args.json is not None:
        write_json(args.json, record)
        logger.info("wrote %s", args.json)


def run_tool(main: Callable[[argparse.Namespace, list[str]], int], args, argv) -> int:
    """``main(args, argv)`` with the CLI's logging; a failure every rank agreed on is one line."""
    setup_logging()
    try:
        return main(args, argv)
    except RankFailure as e:
        logger.error("error: %s", e, exc_info=e if args.debug else None)
        return 1


# -- perplexity ----------------------------------------------------------------------------------
def windows_of(tokens: Sequence[int], context: int, windows: int | None) -> list[list[int]]:
    """``windows`` non-overlapping windows of ``context`` tokens from the start (None: as many
    as the text holds).

    Raises:
        ValueError: the text is too short for them.
    """
    fit = len(tokens) // context
    if context < 2:
        raise ValueError(
            f"--context must be >= 2 tokens (a window scores context-1), got {context}"
        )
    if windows is not None and windows < 1:
        raise ValueError(f"--windows must be >= 1, got {windows}")
    n = fit if windows is None else windows
    if n < 1 or n > fit:
        raise ValueError(
            f"the text has {len(tokens)} tokens: {fit} windows of {context} fit, not "
            f"{n or 1}; lower --windows or --context, or give a longer --text"
        )
    return [list(tokens[k * context : (k + 1) * context]) for k in range(n)]


def score(engine: EngineCore, windows: list[list[int]]) -> list[list[float]]:
    """Every window's prompt log-probabilities (``len - 1`` each), one request per window."""
    requests = [
        Request(k, tuple(w), SamplingConfig(max_new_tokens=1), logprobs=True)
        for k, w in enumerate(windows)
    ]
    outcomes, _ = engine.run(requests)
    out = []
    for w, o in zip(windows, outcomes, strict=True):
        lp = o.logprobs[: len(w) - 1]  # then the sampled token's, which scores nothing
        assert len(lp) == len(w) - 1 and not any(math.isnan(x) for x in lp), len(lp)
        out.append(lp)
    return out


def _prepare(args):
    def prepare(cfg: ModelConfig, codec: Codec) -> list[list[int]]:
        if args.context + 1 > cfg.max_seq_len:
            raise ValueError(
                f"--context {args.context}: a window and the one token the engine samples after "
                f"it must fit the model's max_seq_len={cfg.max_seq_len}; use --context "
                f"{cfg.max_seq_len - 1} or less"
            )
        tokens = codec.encode(args.text.read_text(encoding="utf-8"))
        return windows_of(tokens, args.context, args.windows)

    return prepare


def _run(args, argv: list[str]) -> int:
    with model_on_ranks(args, argv, _prepare(args)) as (pg, model, cfg, _, codec, windows):
        engine = engine_for(args, model, pg, [args.context + 1] * min(args.batch, len(windows)))
        logger.info("scoring %d windows of %d tokens of %s at %s", len(windows), args.context,
                    args.text, layout_name(args))  # fmt: skip
        dist.barrier()
        t0 = time.perf_counter()
        logprobs = score(engine, windows)
        seconds = time.perf_counter() - t0
    n = sum(len(lp) for lp in logprobs)
    nll = -sum(sum(lp) for lp in logprobs) / n
    record = {
        **layout_record(args, cfg), "text": str(args.text),
        "tokenizer": "utf-8 bytes" if codec.bytes_as_tokens else "checkpoint",
        "context": args.context, "windows": len(windows), "tokens": n, "nll_per_token": nll,
        "perplexity": math.exp(nll), "seconds": seconds,
        "window_nll_per_token": [-sum(lp) / len(lp) for lp in logprobs],
    }  # fmt: skip
    if args.token_logprobs:
        record["logprobs"] = logprobs
    publish(args, record, format_table(
        ["layout", "tokens", "nll/token", "perplexity", "seconds"],
        [[record["layout"], str(n), f"{nll:.8f}", f"{math.exp(nll):.5f}", f"{seconds:.2f}"]],
    ))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = tool_parser(__doc__)
    p.add_argument("--text", type=Path, required=True, metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--context", type=int, default=2048, metavar="N", help="tokens per window")
    p.add_argument(
        "--windows", type=int, metavar="K",
        help="how many non-overlapping windows, from the start (default: as many as fit)",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=int, default=1, metavar="B",
        help="windows prefilled together (each rank's KV pool holds B windows)",
    )  # fmt: skip
    p.add_argument(
        "--token-logprobs", action="store_true",
        help="also write every scored token's log-probability to --json (compare layouts token "
        "by token)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    return run_tool(_run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
