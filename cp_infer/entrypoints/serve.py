"""``python -m cp_infer serve``: an HTTP server over the CP ranks.

Every rank loads its shard of the model. HTTP, validation, tokenization and streaming run in an
API process that rank 0 starts (:mod:`cp_infer.serving.api_process`), connected to it by a pipe
(:mod:`cp_infer.serving.ipc`). Rank 0 runs the engine loop: it admits queued requests as others
finish (continuous batching) and sends every rank the same orders, and all of them run the
iterations together (:class:`~cp_infer.serving.loop.ServeLoop`). The other ranks only follow.

Every launched process is its rank's keeper (:mod:`cp_infer.serving.supervisor`): the engine
runs in a child it forks, and a death of any rank's engine restarts all of them while the API
process, rank 0's keeper's child, keeps the clients; every request in flight resumes where its
stream was. Stopping: SIGINT or SIGTERM to the keepers (or to the API process) ends the live
requests (``finish_reason: "abort"``) and stops every engine within a few seconds; a launcher
that is gone, or more deaths than ``--max-restarts``, ends the live requests with an error event
and every process exits non-zero.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import time
import uuid

import torch.distributed as dist

from cp_infer.distributed import (
    RankFailure,
    error_message,
    exit_now,
    on_all_ranks,
    report_failure,
)
from cp_infer.engine.kv_cache import DEFAULT_BLOCK_SIZE
from cp_infer.engine.kv_tier import HOST_TIER_ROOT, model_fingerprint, resolve_tier_path
from cp_infer.engine.runner import ModelRunner
from cp_infer.entrypoints.bootstrap import (
    DTYPES,
    add_model_arguments,
    add_tier_arguments,
    build_model,
    hardware_profile,
    memory_plan,
    model_config,
    parse_ring_min_tokens,
    start_ranks,
    start_tiers,
    weights_identity,
)
from cp_infer.entrypoints.launch import HelpFormatter, add_common_arguments, ensure_launched
from cp_infer.parallel import check_model_fits_layout
from cp_infer.planner import device_memory, human_bytes, parse_bytes
from cp_infer.serving.lifecycle import Watchdog
from parallel_state import parallel_groups, validate_parallel_sizes
from parallel_state.tiers import parse_tier, tier_size

__all__ = ["add_parser", "run"]

logger = logging.getLogger("cp_infer")

API_START_S = 120.0  # how long rank 0's engine waits for the API process to listen

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
    restarts = g.add_argument_group(
        "surviving a rank's death",
        "Each launched process keeps its rank's engine in a child process. When any rank's "
        "engine dies (killed, an error outside a request, a broken collective), every rank's "
        "engine starts again with the same layout and options, the API process keeps its "
        "clients, and every request in flight resumes where its stream was: its prompt and the "
        "tokens it got so far prefilled again, greedy and seeded requests giving exactly the "
        "tokens of an undisturbed run. /health says 503 while the engine restarts; new requests "
        "queue meanwhile (up to --max-queue)",
    )  # fmt: skip
    restarts.add_argument(
        "--max-restarts", type=int, default=3, metavar="N",
        help="restarts allowed within --restart-window; one more death ends the server as "
        "without restarts: every client gets an error and every process exits non-zero "
        "(0: no restarts)",
    )  # fmt: skip
    restarts.add_argument(
        "--restart-window", type=float, default=600.0, metavar="SECONDS",
        help="the window --max-restarts counts deaths in",
    )  # fmt: skip
    restarts.add_argument(
        "--max-resumes", type=int, default=2, metavar="N",
        help="times one request is resumed after the engine died under it; in flight at one "
        "more death, it fails alone with an error, and the server goes on: a request that "
        "crashes the engine every time (a poison pill) does not use up --max-restarts (keep "
        "it below that)",
    )  # fmt: skip
    tier = g.add_argument_group(
        "a second tier for the KV cache",
        "Finished requests' K/V stay in the KV pool for reuse until it needs their blocks. "
        "With a tier, what the pool evicts is written to files first (in the background), "
        "and a prompt that starts with such a sequence (a chat's next turn) reads its K/V "
        "back instead of prefilling them again. The files record positions, heads and layers, "
        "not ranks: a tier written at one layout (--tp/--cp/--pp, a decode tier) is read at "
        "any other, and a server started on a directory uses what is there. A damaged file, or "
        "another model's, is skipped and its prefix prefilled. See docs/serving.md",
    )  # fmt: skip
    tier.add_argument(
        "--kv-tier", metavar="DIR|host",
        help="the tier's directory (one every rank of the engine sees: a local disk on one "
        "host, a shared file system across hosts); 'host': host memory (a directory in "
        f"{HOST_TIER_ROOT}, kept until the machine restarts or you delete it)",
    )  # fmt: skip
    tier.add_argument(
        "--kv-tier-size", default="auto", metavar="SIZE",
        help="bytes the tier may hold (e.g. 64GiB); past it the least recently used entries "
        "go. 'auto': half the free space of its file system when the server starts",
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
    if args.kv_tier_size != "auto":
        if args.kv_tier is None:
            raise ValueError("--kv-tier-size needs --kv-tier DIR|host")
        if parse_bytes(args.kv_tier_size) < 1:
            raise ValueError(f"--kv-tier-size must be > 0, got {args.kv_tier_size}")
    if args.kv_tier == "":
        raise ValueError("--kv-tier needs a directory, or 'host' for host memory")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    sizes = validate_parallel_sizes(world_size, tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep)
    cfg, eos, fmt = model_config(args)
    check_model_fits_layout(cfg, sizes)
    return cfg, eos, fmt


def run(args, argv: list[str]) -> int:
    """This launched process: the rank's keeper (:mod:`cp_infer.serving.supervisor`), which runs
    the rank's engine in a forked child and restarts it when any rank's engine dies; rank 0's
    (the decode tier's first, disaggregated) also runs the API process, which outlives them."""
    from cp_infer.serving.supervisor import Keeper, RestartPolicy

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # else: no launcher to watch
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.max_resumes < 0:
        raise ValueError(f"--max-resumes must be >= 0, got {args.max_resumes}")
    if not args.restart_window > 0:
        raise ValueError(f"--restart-window must be > 0 seconds, got {args.restart_window}")
    tiered = args.prefill is not None or args.decode is not None
    if not launched and tiered:
        start_tiers(args, argv)  # raises, naming the launch
    if not launched:
        try:
            ensure_launched(argv, tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep)
        except ValueError as e:
            raise RankFailure(str(e)) from e
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not tiered:  # pure checks, alike on every rank, before anything starts
        try:
            _check(args, world)
        except ValueError as e:
            raise RankFailure(str(e)) from e
    address, authkey = f"\0cp_infer-engine-{uuid.uuid4().hex}", os.urandom(32)
    api = None
    if rank == _api_rank(args):  # the server's leading rank logs as rank 0 does
        logging.getLogger().setLevel(min(logging.INFO, logging.getLogger().level or logging.INFO))
        api = _start_api(args, address, authkey)
    _preload()
    keeper = Keeper(
        rank=rank, world=world, api=api, watch_parent=launched, timeout_s=args.timeout,
        policy=RestartPolicy(args.max_restarts, args.restart_window),
        engine_main=lambda g: _engine(args, argv, launched, g, (address, authkey)),
    )  # fmt: skip
    # at once: a keeper that hosts the rendezvous store (under DeepSpeed's launcher) took 3 s
    # to shut its interpreter down, and its launcher signals the next rank only after that
    exit_now(keeper.run())


def _preload() -> None:
    """Import, in the keeper, what an engine imports on its way up (megatron-core's parallel
    state; torch's reference ops and what they pull in, sympy and dynamo among them, on the
    first initialisation of a meta tensor): about 900 modules, which every forked engine then
    has for free instead of importing them again at each restart. Runs no kernel: a meta
    tensor has no data, so no thread pool starts before the fork."""
    import megatron.core.parallel_state  # noqa: F401
    import torch

    with torch.device("meta"):
        torch.nn.Embedding(2, 2)


def _api_rank(args) -> int:
    """The world rank whose keeper runs the API process: 0, or the decode tier's first."""
    if args.prefill is None or args.decode is None:
        return 0
    try:
        return tier_size(parse_tier("--prefill", args.prefill))
    except ValueError:  # the engines fail with the message, on every rank
        return 0


def _engine(args, argv: list[str], launched: bool, g, api_address) -> int:
    """A forked engine's main (generation ``g``): 0 when the server stopped on orders."""
    try:
        store = g.store(args.timeout)
        if args.prefill is not None or args.decode is not None:
            tiers, device, args = start_tiers(args, argv, store=store)
            return _run(args, device, tiers, g, api_address)
        return _run(args, start_ranks(args, argv, store=store), None, g, api_address)
    except Exception as e:
        return report_failure(e, args.debug)


def _run(args, device, tiers, g, api_address) -> int:
    """This rank's engine: a colocated one, or a tier of a disaggregated one (the decode tier
    serves the API; the prefill tier takes its jobs)."""
    from cp_infer.engine.core import EngineCore
    from cp_infer.engine.tiering import detach_tier
    from cp_infer.serving.disagg import join_decode_tier, prefill_worker
    from cp_infer.serving.loop import ServeLoop

    prefill_tier = tiers is not None and tiers.tier is tiers.prefill
    cfg, _, fmt = on_all_ranks(lambda: _check(args, dist.get_world_size()))
    leads = dist.get_rank() == 0 and not prefill_tier
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
        if g.gen == 0:
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
        if tiers is not None and not prefill_tier:
            connector = join_decode_tier(engine, tiers, min_tokens=args.disagg_min_tokens,
                                          lead=leads)  # fmt: skip
            logger.info("decode tier: prompts of %d new tokens or more go to the prefill tier",
                        args.disagg_min_tokens)  # fmt: skip
        if args.kv_tier is not None and not prefill_tier:
            _attach_tier(engine, args, cfg)
        loop = ServeLoop(engine)
        # what is loaded by now lives as long as the engine: keep it out of the collector's
        # full passes, whose pauses (on any rank) would stall every rank's iteration
        gc.collect()
        gc.freeze()
        run_id = [uuid.uuid4().hex]  # this generation's heartbeats in the store
        dist.broadcast_object_list(run_id, src=0)
        g.mark_ready()
        logger.info("engine generation %d ready: %.1fs from its start (loading, process groups)",
                    g.gen, time.time() - g.started)  # fmt: skip
        dog = Watchdog(_died, run_id=run_id[0], watch_parent=True).start()
        loop.failed_alone = _died  # this rank fell out of step with the others
        if prefill_tier:
            logger.info("prefill tier ready: taking the decode tier's long prompts")
            prefill_worker(engine, tiers)
        elif leads:
            _lead(loop, api_address)
            if connector is not None:
                connector.close()  # the prefill tier stops too
        else:
            loop.follow()
        dog.stop()
        detach_tier(engine)  # its spills written before the engine goes
        return 0


def _attach_tier(engine, args, cfg) -> None:
    """``--kv-tier``: every rank of the engine attaches (a collective; an error raises on all)."""
    from cp_infer.engine.tiering import attach_tier

    path = resolve_tier_path(args.kv_tier)
    if args.kv_tier_size != "auto":
        budget = parse_bytes(args.kv_tier_size)
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
            budget = shutil.disk_usage(path).free // 2
        except OSError as e:
            raise RuntimeError(f"--kv-tier {path}: {e.strerror or e}: give a directory this user "
                               "can create and write") from None  # fmt: skip
    weights = weights_identity(args)
    fingerprint = model_fingerprint(cfg, dtype=DTYPES[args.dtype], kv_dtype=args.kv_dtype,
                                    weights=weights)  # fmt: skip
    attach_tier(engine, path, fingerprint=fingerprint, budget=budget)


def _died(why: str) -> None:
    """This engine cannot go on (a peer is gone, or it fell out of step): its keeper sees it
    exit and every rank's engine restarts."""
    logger.error("the engine stops: %s", why)
    exit_now(1)


def _lead(loop, api_address) -> None:
    """Rank 0's engine: connect to the API process and lead the engine loop until it says
    stop (or is gone)."""
    from multiprocessing.connection import Client

    from cp_infer.serving.ipc import EngineLink

    address, authkey = api_address
    engine = loop.engine
    deadline = time.monotonic() + API_START_S
    while True:  # the API process may still be starting (its imports, the tokenizer)
        try:
            conn = Client(address, family="AF_UNIX", authkey=authkey)
            break
        except (ConnectionRefusedError, FileNotFoundError) as e:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the API process did not listen within {API_START_S:.0f}s"
                ) from e
            if engine.idle_for() >= 1.0:  # the followers wait for the first plan meanwhile
                engine.heartbeat()
            time.sleep(0.05)
    link = EngineLink(conn, lambda: (engine.pool_stats(), engine.timer.estimates))
    loop.on_step = link.step
    try:
        loop.lead(link.next_batch, link.emit, link.cancelled, link.done,
                  waiting=lambda: link.queued)  # fmt: skip
    except Exception as e:  # a rank is gone (its collective broke)
        _died(f"the engine loop stopped: {error_message(e)}")


def _start_api(args, address: str, authkey: bytes):
    """Rank 0's keeper: spawn the API process (it starts while the engines load: its /health
    says "starting" until the engine first asks for requests). None when the model's config
    does not read: the engines then fail with the reason, on every rank."""
    from cp_infer.serving.api_process import ApiControl, ApiSettings

    try:
        cfg, eos, _ = model_config(args)
    except Exception:
        return None
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or ()))
    layout = {k: str(getattr(args, k)) for k in ("tp", "cp", "pp", "ep")}
    settings = ApiSettings(
        host=args.host, port=args.port, model_name=args.model_name or cfg.name,
        checkpoint=None if args.checkpoint is None else str(args.checkpoint),
        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, max_batch=args.max_batch_size,
        max_queue=args.max_queue, eos_ids=eos_ids, info=layout,
        tbt_slo_s=None if args.tbt_slo_ms is None else args.tbt_slo_ms / 1000,
        log_level=logging.getLogger().getEffectiveLevel(), engine_address=address,
        authkey=authkey, max_resumes=args.max_resumes,
    )  # fmt: skip
    return ApiControl.start(settings)
