"""``python -m cp_infer generate``: a JSONL file of requests in, generations out.

The command runs in four phases, each ending at a check point that every rank agrees on
(:func:`cp_infer.distributed.on_all_ranks`), so a failure anywhere stops every rank with the
same message and nobody waits in a collective:

1. :func:`prepare` checks everything that needs no weights: the layout against the world size
   and the model, the model's config (features we cannot run exactly are refused), the
   sampling options, and every request (schema, tokens, vocabulary, context).
2. The writer rank checks that the output paths can be written.
3. The model is built and its weights loaded, each rank reading only its shards.
4. Generation, then the writer writes the outputs, all or nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cp_infer.attention import VARIANTS
from cp_infer.attention.kernels import get_kernel
from cp_infer.checkpoint.formats import has_tokenizer, load_tokenizer
from cp_infer.distributed import on_all_ranks
from cp_infer.engine import Conversation, GenerationResult, SamplingConfig, generate
from cp_infer.engine.core import check_request
from cp_infer.engine.offline import new_engine, pool_tokens
from cp_infer.entrypoints.bootstrap import (
    add_model_arguments,
    add_tier_arguments,
    build_model,
    hardware_profile,
    memory_plan,
    model_config,
    parse_ring_min_tokens,
    start_ranks,
    start_tiers,
)
from cp_infer.entrypoints.launch import HelpFormatter, add_common_arguments
from cp_infer.models.config import ModelConfig
from cp_infer.parallel import check_model_fits_layout
from cp_infer.parallel.pipeline import spp_chunk
from cp_infer.planner import check_fits, device_memory
from cp_infer.reporting import atomic_files, check_writable
from cp_infer.schema import read_requests
from parallel_state import ParallelGroups, parallel_groups, validate_parallel_sizes

__all__ = ["GenerateJob", "add_parser", "prepare", "run"]

logger = logging.getLogger("cp_infer")

_DESCRIPTION = """\
Prefill every request with ring attention over the CP ranks, then decode.

Launch one process per rank, world size = tp * cp * pp (x dp replicas, which run the same
batch; use them with --ep to spread experts further):

  torchrun --standalone --nproc-per-node 2 -m cp_infer generate --preset tiny-llama --cp 2 \\
      --input examples/prompts.jsonl --output out.jsonl
  deepspeed --num_gpus 2 --module cp_infer generate --preset tiny-llama --cp 2 ...

A layout of one process (no --tp/--cp/--pp) also runs without a launcher.

Input: one JSON object per line, with an optional "id" (integer or string) and exactly one of
"prompt" (text; needs the checkpoint's tokenizer), "token_ids" (integers) or "turns" (a
chat: a list of turns, each text or token ids). Everything that needs no weights (the layout,
the model config, every request, the output paths) is checked before any weight is loaded;
a failure stops every rank with the same one-line message (add --debug for the traceback),
and no output file is written. See docs/cli.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "generate",
        help="generate tokens for a JSONL file of requests",
        description=_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    g.add_argument("--input", type=Path, required=True, metavar="JSONL", help="the requests")
    g.add_argument("--output", type=Path, required=True, metavar="JSONL", help="the generations")
    g.add_argument(
        "--save-logits", type=Path, metavar="FILE",
        help="also write each request's first-token logits (safetensors, keyed by id)",
    )  # fmt: skip
    g.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per turn")
    g.add_argument(
        "--logprobs", type=int, metavar="N",
        help="also write each generated token's log-probability (\"logprobs\") and the N most "
        "likely tokens at its position (\"top_logprobs\": [id, logprob] pairs), as Megatron's "
        "and OpenAI's APIs give them",
    )  # fmt: skip
    g.add_argument(
        "--chat", action="store_true",
        help="text prompts (and each text turn of a chat) are user messages, rendered with the "
        "checkpoint's chat template (a GGUF file's, or tokenizer_config.json's); a chat's later "
        "turns prefill only what the template adds after the cached answer",
    )  # fmt: skip
    g.add_argument(
        "--stream", action="store_true",
        help="print each answer as text while it is generated (the batch's answers one after "
        "the other, each prompt or question before it), besides writing --output",
    )  # fmt: skip
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    g.add_argument(
        "--prefill-chunk", metavar="N|auto", default="auto",
        help="prefill long prompts N tokens per sequence at a time, each chunk over the KV cache "
        "the earlier ones left (exact); with --pp > 1 the chunks stream through the stages "
        "(sequence pipeline parallelism). auto: chunks sized for a 5%% pipeline bubble when "
        "--pp > 1, one step otherwise",
    )  # fmt: skip
    g.add_argument(
        "--variant", choices=[*VARIANTS, "auto"], default="auto",
        help="prefill ring variant; auto picks per step the one --hardware's model predicts "
        "faster (the paper's Alg. 1 with every cost the model has: for GQA models pass-KV "
        "unless most of the context is cached)",
    )  # fmt: skip
    g.add_argument(
        "--ring-min-tokens", type=parse_ring_min_tokens, default=0, metavar="N|auto",
        help="a prompt (with its chat history) of fewer than N tokens runs on a single CP rank "
        "(its KV there, local attention), a longer one on the ring; 'auto': N from the "
        "--hardware model (serve's default). Default 0: every prompt on the ring",
    )  # fmt: skip
    add_model_arguments(g)
    add_tier_arguments(g, "generate")
    add_common_arguments(g)
    g.set_defaults(run=run)
    return g


@dataclass(frozen=True)
class GenerateJob:
    """Everything checked before any weight is loaded.

    Attributes:
        cfg: the model's shape.
        sampling: how to pick tokens.
        ids: one per request.
        turns: per request, the token ids of each turn (one turn unless ``chat``).
        chat: the requests are multi-turn chats.
        seeds: each request's sampling seed (its own ``seed``, else ``--seed``).
        tokenizer: a ``tokenizers.Tokenizer`` from the checkpoint, or None.
        texts: per request, each turn's text as given (None for token ids): what ``--stream``
            prints before an answer.
        checkpoint_format: ``"hf"``, ``"megatron"`` or ``"gguf"`` (None for a preset).
    """

    cfg: ModelConfig
    sampling: SamplingConfig
    ids: list[int | str]
    turns: list[list[list[int]]]
    chat: bool
    seeds: list[int]
    tokenizer: object | None
    checkpoint_format: str | None
    texts: list[list[str | None]]


def prepare(args, world_size: int, device: torch.device) -> GenerateJob:
    """Check everything that needs no weights, in the order a user would fix it.

    Raises:
        ValueError: the first problem found, naming the fix (the same on every rank).
    """
    get_kernel(args.kernel, device)  # a backend missing here fails now
    if args.make_vocab_size_divisible_by < 1:
        raise ValueError(
            f"--make-vocab-size-divisible-by must be >= 1, got {args.make_vocab_size_divisible_by}"
        )
    hardware_profile(args.hardware)  # a name that is no profile fails now
    if args.prefill_chunk != "auto" and (
        not args.prefill_chunk.isdigit() or int(args.prefill_chunk) < 1
    ):
        raise ValueError(f"--prefill-chunk must be auto or a number of tokens >= 1, got "
                         f"{args.prefill_chunk!r}")  # fmt: skip
    if args.logprobs is not None and not 0 <= args.logprobs <= 20:
        raise ValueError(
            f"--logprobs must be in 0..20 (alternatives per token), got {args.logprobs}"
        )
    sizes = validate_parallel_sizes(world_size, tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep)
    cfg, eos, fmt = model_config(args)
    check_model_fits_layout(cfg, sizes)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, eos_id=eos,
    )  # fmt: skip
    bad_eos = sorted(t for t in sampling.eos_ids if t >= cfg.vocab_size)
    if bad_eos:
        raise ValueError(f"eos ids {bad_eos} are outside the vocabulary [0, {cfg.vocab_size})")
    ids, requests = read_requests(args.input)
    has_text = any(isinstance(t, str) for r in requests for t in r.turn_list)
    tokenizer = None
    if has_text or has_tokenizer(args.checkpoint):
        if args.checkpoint is None:
            raise ValueError('text prompts need a --checkpoint with a tokenizer; give "token_ids"')
        tokenizer = load_tokenizer(args.checkpoint)
    if (args.chat or args.stream) and tokenizer is None:
        raise ValueError(
            f"--{'chat' if args.chat else 'stream'} needs a --checkpoint with a tokenizer "
            "(tokenizer.json, or a GGUF file)"
        )
    if args.chat:
        turns = _chat_turns(args, ids, requests)
    else:
        turns = [
            [tokenizer.encode(t).ids if isinstance(t, str) else list(t) for t in r.turn_list]
            for r in requests
        ]
    n_turns = sorted({len(t) for t in turns})
    if len(n_turns) > 1:
        raise ValueError(
            f"{args.input}: requests have {n_turns} turns; they run as one batch, turn by "
            "turn: put chats with different numbers of turns in separate files"
        )
    before = [0] * len(turns)
    for k in range(n_turns[0]):  # every turn fits, counting max_new_tokens per earlier turn
        for j, t in enumerate(turns):
            check_request(t[k], sampling.max_new_tokens, vocab_size=cfg.vocab_size,
                          max_seq_len=cfg.max_seq_len, earlier=before[j],
                          name=f"prompt {ids[j]!r}", budget="--max-new-tokens")  # fmt: skip
            before[j] += len(t[k]) + sampling.max_new_tokens
    plan = memory_plan(
        args, cfg, context=max(before), batch=len(turns),
        device_bytes=device_memory(args.device_memory, device),
    )  # fmt: skip
    check_fits(plan, f"{len(turns)} requests of up to {max(before)} tokens")
    chat = any(r.is_chat for r in requests)
    seeds = [r.seed if r.seed is not None else args.seed for r in requests]
    texts = [[t if isinstance(t, str) else None for t in r.turn_list] for r in requests]
    return GenerateJob(cfg, sampling, ids, turns, chat, seeds, tokenizer, fmt, texts)


def _chat_turns(args, ids, requests) -> list[list[list[int]]]:
    """``--chat``: every request's turns through the checkpoint's chat template."""
    from cp_infer.entrypoints.chat import chat_turns

    for i, r in zip(ids, requests, strict=True):
        if not all(isinstance(t, str) for t in r.turn_list):
            raise ValueError(
                f"--chat renders text: request {i!r} has a turn of token ids; send text, or "
                "drop --chat"
            )
    template = load_tokenizer(args.checkpoint, transformers=True)
    return [chat_turns(template, r.turn_list) for r in requests]


def _is_writer(pg: ParallelGroups) -> bool:
    return pg.is_last_pp_stage and pg.tp_rank == 0 and pg.cp_rank == 0 and pg.dp_rank == 0


def check_output_paths(args) -> None:
    paths = {"--output": args.output, "--save-logits": args.save_logits}
    paths = {flag: p for flag, p in paths.items() if p is not None}
    for flag, path in paths.items():
        check_writable(path, flag)
        if path.resolve() == args.input.resolve():
            raise ValueError(f"{flag} {path} is the --input file; choose another path")
    if len({p.resolve() for p in paths.values()}) < len(paths):
        raise ValueError("--output and --save-logits are the same file; choose two paths")


def run(args, argv: list[str]) -> int:
    if args.prefill is not None or args.decode is not None:
        return run_tiers(args, argv)
    device = start_ranks(args, argv)
    job = on_all_ranks(lambda: prepare(args, dist.get_world_size(), device))
    n_tokens = sum(len(t) for turns in job.turns for t in turns)
    logger.info(
        "checked %d requests (%d prompt tokens, %d turn%s each) for %s: ok",
        len(job.ids), n_tokens, len(job.turns[0]), "s" if len(job.turns[0]) > 1 else "",
        job.cfg.name,
    )  # fmt: skip
    with parallel_groups(
        tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep, timeout_s=args.timeout
    ) as pg:
        writer = _is_writer(pg)
        on_all_ranks(lambda: check_output_paths(args) if writer else None)
        if writer:  # with PP the writer sits on the last stage, not rank 0: let it report
            logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
        if pg.dp > 1:
            logger.info(
                "world size %d = tp*cp*pp x %d: the %d data-parallel replicas run the same batch "
                "(they form the EP groups)", pg.world_size, pg.dp, pg.dp,
            )  # fmt: skip
        logger.info(
            "%s | model %s (%.1fM params)", pg.describe(), job.cfg.name, job.cfg.n_params() / 1e6
        )
        model = on_all_ranks(lambda: build_model(args, job.cfg, job.checkpoint_format, pg, device))
        conversation = Conversation()
        results = []
        for turn in range(len(job.turns[0])):
            printer = _printer(args, job, turn) if writer else None
            results.append(
                generate(
                    model, pg, [t[turn] for t in job.turns], job.sampling, seeds=job.seeds,
                    variant=args.variant, kernel=args.kernel, conversation=conversation,
                    progress=pg.rank == 0,
                    hardware=hardware_profile(args.hardware),
                    exchange=args.decode_exchange, timeout_s=args.timeout,
                    kv_dtype=args.kv_dtype,
                    prefill_chunk=_prefill_chunk(args, [t[turn] for t in job.turns], pg.pp),
                    logprobs=args.logprobs, names=job.ids, ring_min_tokens=args.ring_min_tokens,
                    on_tokens=printer.token if printer is not None else None,
                )
            )  # fmt: skip
            if printer is not None:
                printer.finish()
            if writer:
                logger.info("%s", summary(results[-1], turn if job.chat else None))
        on_all_ranks(lambda: write_outputs(args, job, results) if writer else None)
    return 0


def _printer(args, job: GenerateJob, turn: int):
    """``--stream``: the writer's printer of this turn's answers (None without the flag)."""
    if not args.stream:
        return None
    from cp_infer.entrypoints.chat import StreamPrinter

    return StreamPrinter(
        job.tokenizer.decode, job.ids, [t[turn] for t in job.texts],
        eos_ids=job.sampling.eos_ids, budget=job.sampling.max_new_tokens,
    )  # fmt: skip


def _prefill_chunk(args, prompts: list[list[int]], pp: int) -> int | None:
    """--prefill-chunk as tokens (None: one step)."""
    if args.prefill_chunk != "auto":
        return int(args.prefill_chunk)
    longest = max(len(p) for p in prompts)
    chunk = spp_chunk(longest, pp)
    return chunk if chunk < longest else None  # spp_chunk is the whole prompt at pp=1


def summary(r: GenerationResult, turn: int | None) -> str:
    """TTFT, prefill throughput, TTIT and decode throughput of one generate() call."""
    head = f"turn {turn}: " if turn is not None else ""
    text = (
        f"{head}TTFT {r.ttft_s * 1e3:.1f} ms ({r.prefill_tokens} prefill tokens, "
        f"{r.prefill_tokens / max(r.ttft_s, 1e-9):.0f} tokens/s)"
    )
    if r.decode_step_s:
        steps, total = len(r.decode_step_s), sum(r.decode_step_s)
        decoded = sum(len(t) for t in r.tokens) - len(r.tokens)  # the first comes from prefill
        text += (
            f" | TTIT {total / steps * 1e3:.1f} ms over {steps} steps "
            f"({decoded / max(total, 1e-9):.0f} tokens/s for {len(r.tokens)} sequences)"
        )
    if r.placed.get("rank"):
        text += f" | {r.placed['rank']} on single CP ranks, {r.placed['ring']} on the ring"
    return text


def write_outputs(args, job: GenerateJob, results: list[GenerationResult]) -> None:
    """Generations (and logits) into temporary files, renamed together at the end."""
    tok = job.tokenizer

    def entry(r: GenerationResult, i: int) -> dict:
        ids = r.tokens[i]
        out = {"token_ids": ids, "text": tok.decode(ids) if tok is not None else None}
        if r.logprobs is not None:
            out["logprobs"] = r.logprobs[i]
            out["top_logprobs"] = [[list(a) for a in alts] for alts in r.top_logprobs[i]]
        return out

    paths = [args.output] + ([args.save_logits] if args.save_logits is not None else [])
    with atomic_files(*paths) as tmps:
        with tmps[0].open("w") as f:
            for i, rid in enumerate(job.ids):
                if job.chat:
                    row = {"id": rid, "turns": [entry(r, i) for r in results]}
                else:
                    row = {"id": rid, **entry(results[0], i)}
                f.write(json.dumps(row) + "\n")
        if args.save_logits is not None:
            from safetensors.torch import save_file

            tensors = {
                (f"{rid}/{turn}" if job.chat else str(rid)): r.first_logits[i].contiguous()
                for turn, r in enumerate(results)
                for i, rid in enumerate(job.ids)
            }
            save_file(tensors, str(tmps[1]))
    logger.info("wrote %d generations to %s", len(job.ids), args.output)
    if args.save_logits is not None:
        logger.info("wrote first-token logits to %s", args.save_logits)
    for i, rid in enumerate(job.ids):
        tokens = [r.tokens[i] for r in results] if job.chat else results[0].tokens[i]
        logger.info("id=%s generated %s", rid, tokens)


def run_tiers(args, argv: list[str]) -> int:
    """``generate --prefill LAYOUT --decode LAYOUT``: the two tiers of a disaggregated server
    (:func:`cp_infer.serving.disagg.generate_disaggregated`), each rank in its tier's layout,
    the requests from the input file."""
    from cp_infer.serving.disagg import generate_disaggregated

    tiers, device, targs = start_tiers(args, argv)
    job = on_all_ranks(lambda: prepare(targs, tiers.tier.size, device))
    decode = tiers.tier is tiers.decode
    with parallel_groups(tp=targs.tp, cp=targs.cp, pp=targs.pp, ep=targs.ep,
                         timeout_s=args.timeout) as pg:  # fmt: skip
        writer = decode and pg.rank == 0  # it leads the decode tier: the outcomes are its
        on_all_ranks(lambda: check_output_paths(args) if writer else None)
        if writer:
            logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
        logger.info("%s | %s", tiers.tier.describe(), pg.describe())
        model = on_all_ranks(lambda: build_model(targs, job.cfg, job.checkpoint_format, pg, device))
        lengths = ([job.cfg.max_seq_len] * len(job.turns) if job.chat
                   else [len(t[0]) + job.sampling.max_new_tokens for t in job.turns])  # fmt: skip
        engine = new_engine(
            model, pg, kv_tokens=pool_tokens(lengths, pg.cp),
            max_batch=len(job.turns) if decode else 1, kernel=args.kernel,
            exchange=args.decode_exchange, hardware=hardware_profile(args.hardware),
            timeout_s=args.timeout, kv_dtype=args.kv_dtype,
        )  # fmt: skip
        engine.configure(variant=args.variant, prefill_chunk=None, progress=False)
        turns = on_all_ranks(lambda: generate_disaggregated(
            engine, tiers, [list(t) for t in job.turns], job.sampling, seeds=job.seeds,
            min_tokens=args.disagg_min_tokens,
        ))  # fmt: skip
        if writer:
            stats = engine.pool_stats()
            logger.info("decode tier: handed in %d (token, KV head, layer) triples for %d "
                        "prompts the prefill tier prefilled", stats.handoff_tokens,
                        stats.remote_prefills)  # fmt: skip
        results = [GenerationResult(tokens=t) for t in turns or []]
        on_all_ranks(lambda: write_outputs(args, job, results) if writer else None)
    return 0
