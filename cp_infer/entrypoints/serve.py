"""``python -m cp_infer serve``: an HTTP server over the CP ranks.

Every rank loads its shard of the model. HTTP, validation, tokenization and streaming run in an
API process that rank 0 starts (:mod:`cp_infer.serving.api_process`), connected to it by a pipe
(:mod:`cp_infer.serving.ipc`). Rank 0 runs the engine loop: it admits queued requests as others
finish (continuous batching) and sends every rank the same orders, and all of them run the
iterations together (:class:`~cp_infer.serving.loop.ServeLoop`). The other ranks only follow.

Stopping (:mod:`cp_infer.serving.lifecycle`): SIGINT or SIGTERM to rank 0 (or to the API
process) ends the live requests (``finish_reason: "abort"``) and tells the other ranks to stop,
all within a few seconds; a rank that dies, or a launcher that is gone, ends the live requests
with an error event and every rank exits non-zero.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import threading
import uuid

import torch.distributed as dist

from cp_infer.distributed import error_message, exit_now, on_all_ranks, peer_failure
from cp_infer.engine.kv_cache import DEFAULT_BLOCK_SIZE
from cp_infer.engine.runner import ModelRunner
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
from cp_infer.parallel import check_model_fits_layout
from cp_infer.planner import device_memory, human_bytes, parse_bytes
from parallel_state import parallel_groups, validate_parallel_sizes

__all__ = ["add_parser", "run"]

logger = logging.getLogger("cp_infer")

_DESCRIPTION = """\
Serve a model over HTTP, its context split over the CP ranks. Rank 0 answers:

  PUT  /api                    Megatron-LM's text generation API
  POST /v1/completions         OpenAI completions (text or token ids; stream: true for SSE)
  POST /v1/chat/completions    OpenAI chat (the checkpoint's chat template)
  GET  /v1/models, /health
  GET  /metrics                Prometheus: requests, tokens, TTFT, time per token, steps
  POST /tokenize, /detokenize  vLLM's: a prompt's tokens (and the context limit), or text

Requests that share a prefix with an earlier one (a chat resending its history) prefill only
the rest, over the KV cache the earlier one left on the CP ranks (usage.prompt_tokens_details
.cached_tokens says how many tokens were reused).

Requests join and leave the running batch one at a time. Each iteration runs a decode step of
the running requests and then a prefill step of the waiting ones; --tbt-slo-ms caps that
prefill to the chunk that keeps the running requests' time between tokens under the target
(sized from --hardware's profile, corrected by what the server measures), so a long prompt
arriving does not stall the others.

  torchrun --standalone --nproc-per-node 2 -m cp_infer serve --preset tiny-llama --cp 2 --port 8000
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0}'

See docs/serving.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "serve", help="serve the model over HTTP (OpenAI and Megatron APIs)",
        description=_DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    g.add_argument("--host", default="127.0.0.1", help="address rank 0 listens on")
    g.add_argument("--port", type=int, default=8000, help="port rank 0 listens on")
    g.add_argument("--model-name", help="the name /v1/models lists (default: the model's)")
    g.add_argument(
        "--max-batch-size", type=int, default=8,
        help="requests in flight (prefilling or decoding) at most; more wait in the queue",
    )  # fmt: skip
    g.add_argument(
        "--tbt-slo-ms", type=float, metavar="MS",
        help="time-between-tokens target: while requests decode, a waiting prompt prefills in "
        "chunks sized so that each iteration (decode step + chunk) stays under MS (default: "
        "prompts prefill whole, stalling running decodes for that long)",
    )  # fmt: skip
    g.add_argument(
        "--ring-min-tokens", type=parse_ring_min_tokens, default="auto", metavar="N|auto",
        help="where each request runs in the CP group. A request whose context (prompt and "
        "cached history) is at least N tokens runs on the ring (its prefill split over the CP "
        "ranks, its decode attended over them); a shorter one runs on a single CP rank, the "
        "least loaded (its KV there, local attention, no CP collective: the ranks serve short "
        "requests data-parallel). 0: every request on the ring. 'auto': N is where the "
        "--hardware model's ring prefill beats one rank's (`cp_infer plan` prints it for a "
        "layout; the server logs it). A chat's next turn goes where its cache is, onto the "
        "ring once it has grown past N. Placement counts are on /metrics",
    )  # fmt: skip
    g.add_argument("--max-queue", type=int, default=64, help="waiting requests; more get a 503")
    g.add_argument(
        "--kv-cache-memory", default="auto", metavar="SIZE",
        help="bytes of each rank's KV pool, allocated once (e.g. 2GiB, 512MiB): the K/V of "
        "every layer of its stage, FP8 scales included. Running requests, and finished ones "
        "kept for prefix reuse, share it; a request waits when it is full, and the latest is "
        "preempted (recomputed later) when running decodes outgrow it. 'auto': what "
        "--device-memory leaves after the weights and the peak activations of a "
        "max_seq_len prefill (see docs/serving.md)",
    )  # fmt: skip
    g.add_argument(
        "--no-prefix-sharing",
        dest="prefix_sharing",
        action="store_false",
        help="prefill every prompt whole, sharing no cached prefix (a cold baseline)",
    )
    g.add_argument(
        "--kv-block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N",
        help="token slots per KV block: the unit of allocation and of prefix sharing",
    )  # fmt: skip
    add_model_arguments(g)
    add_tier_arguments(g, "serve")
    add_common_arguments(g)
    g.set_defaults(run=run)
    return g


def kv_pool_bytes(args, cfg, device) -> int:
    """``--kv-cache-memory`` in bytes; ``auto``: what ``--device-memory`` leaves after this
    rank's weights and the peak activations of a ``max_seq_len`` prefill (the planner's
    figures, as vLLM sizes its pool from ``gpu_memory_utilization``)."""
    if args.kv_cache_memory != "auto":
        return parse_bytes(args.kv_cache_memory)
    budget = device_memory(args.device_memory, device)
    plan = memory_plan(args, cfg, context=cfg.max_seq_len, batch=1, device_bytes=budget)
    left = budget - plan.weight_bytes - plan.activation_bytes
    if left <= 0:
        raise ValueError(
            f"--device-memory {human_bytes(budget)} leaves nothing for the KV cache after the "
            f"weights ({human_bytes(plan.weight_bytes)}) and the activations "
            f"({human_bytes(plan.activation_bytes)}): raise --device-memory, --tp or --pp, or "
            "give --kv-cache-memory"
        )
    return left


def _check(args, world_size: int):
    for name in ("max_batch_size", "max_queue", "kv_block_size"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if args.tbt_slo_ms is not None and args.tbt_slo_ms <= 0:
        raise ValueError(f"--tbt-slo-ms must be > 0, got {args.tbt_slo_ms}")
    if args.kv_cache_memory != "auto":
        parse_bytes(args.kv_cache_memory)  # a size that does not read fails now
    hardware_profile(args.hardware)  # a name that is no profile fails now
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    sizes = validate_parallel_sizes(world_size, tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep)
    cfg, eos, fmt = model_config(args)
    check_model_fits_layout(cfg, sizes)
    return cfg, eos, fmt


def run(args, argv: list[str]) -> int:
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # else: no launcher to watch
    if args.prefill is not None or args.decode is not None:
        tiers, device, args = start_tiers(args, argv)
        return _run(args, device, launched, tiers)
    return _run(args, start_ranks(args, argv), launched, None)


def _run(args, device, launched: bool, tiers) -> int:
    """This rank's part of the server: a colocated one, or a tier of a disaggregated one (the
    decode tier serves the API; the prefill tier takes its jobs)."""
    from cp_infer.engine.core import EngineCore
    from cp_infer.serving.disagg import join_decode_tier, prefill_worker
    from cp_infer.serving.loop import ServeLoop

    prefill_tier = tiers is not None and tiers.tier is tiers.prefill
    cfg, eos, fmt = on_all_ranks(lambda: _check(args, dist.get_world_size()))
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or ()))
    # the API process starts while the ranks load the model (its /health says "starting" until
    # the engine first asks for requests)
    leads = dist.get_rank() == 0 and not prefill_tier
    api = _start_api(args, cfg, eos_ids, device) if leads else None
    with parallel_groups(
        tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep, timeout_s=args.timeout
    ) as pg:
        logger.info("%s | model %s (%.1fM params)", pg.describe(), cfg.name, cfg.n_params() / 1e6)
        model = on_all_ranks(lambda: build_model(args, cfg, fmt, pg, device))
        kv_memory = on_all_ranks(lambda: kv_pool_bytes(args, cfg, device))
        runner = ModelRunner(
            model, pg, kernel=args.kernel, exchange=args.decode_exchange, timeout_s=args.timeout,
            kv_dtype=args.kv_dtype, hardware=hardware_profile(args.hardware),
            kv_memory=kv_memory, kv_block_size=args.kv_block_size,
        )  # fmt: skip
        pool = runner.cache.pool
        logger.info(
            "KV pool: %d blocks of %d tokens per rank (%s, %d tokens over the CP ranks)",
            pool.n_blocks, pool.block_size, human_bytes(runner.cache.nbytes()),
            pool.tokens * pg.cp,
        )  # fmt: skip
        engine = EngineCore(  # the chunks are sized from the runner's hardware model
            runner, max_batch=args.max_batch_size, share_prefixes=args.prefix_sharing,
            tbt_slo_s=None if args.tbt_slo_ms is None else args.tbt_slo_ms / 1000,
            # a prefill tier streams each prompt's K/V as its ring laid them out
            ring_min_tokens=0 if prefill_tier else args.ring_min_tokens,
        )  # fmt: skip
        connector = None
        if prefill_tier:
            logger.info("prefill tier ready: taking the decode tier's long prompts")
            prefill_worker(engine, tiers)
            return 0
        if tiers is not None:
            connector = join_decode_tier(engine, tiers, min_tokens=args.disagg_min_tokens,
                                          lead=leads)  # fmt: skip
            logger.info("decode tier: prompts of %d new tokens or more go to the prefill tier",
                        args.disagg_min_tokens)  # fmt: skip
        loop = ServeLoop(engine)
        # what is loaded by now lives as long as the server: keep it out of the collector's
        # full passes, whose pauses (on any rank) would stall every rank's iteration
        gc.collect()
        gc.freeze()
        run_id = [uuid.uuid4().hex]  # this run's heartbeats in the store
        dist.broadcast_object_list(run_id, src=0)
        if dist.get_rank() != 0:
            return _follow(loop, run_id[0], launched)
        code = _serve(loop, *api, run_id[0], launched)
        if connector is not None:
            connector.close()  # the prefill tier stops too
        return code


def _follow(loop, run_id: str, launched: bool) -> int:
    """A rank other than 0: run what rank 0 sends until it says stop."""
    from cp_infer.serving.lifecycle import Watchdog, follower_signals

    follower_signals()
    dog = Watchdog(lambda _why: exit_now(1), run_id=run_id, watch_parent=launched).start()
    loop.follow()
    dog.stop()
    return 0


def _start_api(args, cfg, eos_ids, device):
    """Rank 0: spawn the API process; returns it and this end of its pipe."""
    import multiprocessing

    from cp_infer.serving.api_process import ApiSettings, run_api

    settings = ApiSettings(
        host=args.host, port=args.port, model_name=args.model_name or cfg.name,
        checkpoint=None if args.checkpoint is None else str(args.checkpoint),
        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, max_batch=args.max_batch_size,
        max_queue=args.max_queue, eos_ids=eos_ids,
        info={k: str(getattr(args, k)) for k in ("tp", "cp", "pp", "ep")},
        tbt_slo_s=None if args.tbt_slo_ms is None else args.tbt_slo_ms / 1000,
        log_level=logging.getLogger().getEffectiveLevel(),
    )  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe(duplex=True)
    api = ctx.Process(target=run_api, args=(there, settings), name="cp_infer-api", daemon=True)
    api.start()
    there.close()
    return api, here


def _serve(loop, api, conn, run_id: str, launched: bool) -> int:
    """Rank 0: lead the engine beside the API process, and stop everything together."""
    from cp_infer.serving.ipc import EngineLink
    from cp_infer.serving.lifecycle import STOP_GRACE_S, Watchdog

    engine = loop.engine
    link = EngineLink(conn, lambda: (engine.pool_stats(), engine.timer.estimates))
    loop.on_step = link.step
    failures: list[str] = []

    def fail(why: str) -> None:  # a rank or the launcher is gone: end everything, exit non-zero
        if not failures:
            failures.append(why)
            link.fail(why)

    loop.failed_alone = fail  # this rank fell out of step with the others

    def lead() -> None:
        try:
            loop.lead(link.next_batch, link.emit, link.cancelled, link.done,
                      waiting=lambda: link.queued)  # fmt: skip
        except BaseException as e:  # a rank is gone (its collective broke)
            logger.error("engine loop stopped: %s", error_message(e))
            fail(f"the engine stopped: {error_message(e)}")

    # A handler only notes the signal; the loop below acts on it. Acting in the handler
    # deadlocked: a second signal (DeepSpeed's launcher sends rank 0 one right after the
    # group's) ran the handler again inside the first one's send, on the link's lock.
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda sig, _frame: signals.append(sig))
    thread = threading.Thread(target=lead, name="engine", daemon=True)
    dog = Watchdog(fail, run_id=run_id, watch_parent=launched)
    thread.start()
    dog.start()
    told = False
    while thread.is_alive() and not failures and api.is_alive():
        thread.join(timeout=0.2)  # short waits: signals are handled between them
        if signals and not told:  # a launcher also stops the ranks when one failed
            told = True
            cause = peer_failure() or dog.dead_peer()
            if cause is not None:
                fail(cause)
            else:
                link.stop(f"the server is stopping ({signal.Signals(signals[0]).name})")
    if failures:  # the API process ends the streams with the error, then exits
        api.join(timeout=STOP_GRACE_S)
        dog.stop()
        logger.error("stopped: %s", failures[0])
        exit_now(1)  # the engine may be blocked in a collective with the dead rank
    thread.join(timeout=STOP_GRACE_S + 1)  # the API stopped: the engine sends the ranks stop
    api.join(timeout=STOP_GRACE_S + 1)
    dog.stop()
    if thread.is_alive():
        logger.error("the engine did not stop within %.0fs; exiting", STOP_GRACE_S)
        exit_now(1)
    if api.exitcode != 0:
        logger.error("the API process exited with code %s", api.exitcode)
        exit_now(1)
    logger.info("stopped")
    return 0
