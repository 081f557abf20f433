"""How every front door gets its model config, layout, ranks and model.

``generate``, ``serve`` and the tools that run a model (``tools/perplexity.py``) share these
steps, so they take the same flags and check them the same way: the model and layout flags
(:func:`add_model_arguments`, :func:`add_tier_arguments`), the model's config
(:func:`model_config`), the memory plan, the process groups (:func:`start_ranks`, or
:func:`start_tiers` for a prefill tier and a decode tier), and this rank's shard of the model
with its weights loaded (:func:`build_model`). The checks that need no process group raise
:class:`~cp_infer.distributed.RankFailure` alike on every rank, before any rank waits in one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
from pathlib import Path

import torch
import torch.distributed as dist

from cp_infer.attention.kernels import KERNELS
from cp_infer.attention.kv_quant import KV_DTYPES
from cp_infer.checkpoint.formats import detect_format, open_source, read_config
from cp_infer.checkpoint.manifest import verify_manifest
from cp_infer.collectives import EXCHANGES
from cp_infer.distributed import RankFailure, clear_failure
from cp_infer.entrypoints.launch import ensure_launched
from cp_infer.hardware import PROFILES, Profile, profile
from cp_infer.models.config import (
    PRESETS,
    RUNNABLE_PRESETS,
    ModelConfig,
    fp8_checkpoint_layers,
    get_preset,
)
from cp_infer.planner import plan_memory
from cp_infer.quant import FP8_LAYERS, quantize_model
from cp_infer.quant.fp8 import BACKENDS as FP8_BACKENDS
from parallel_state import ParallelGroups, init_distributed
from parallel_state.tiers import init_tiers, parse_tier, tier_layout, tier_size

__all__ = [
    "DTYPES",
    "add_model_arguments",
    "add_tier_arguments",
    "build_model",
    "hardware_profile",
    "memory_plan",
    "model_config",
    "parse_ring_min_tokens",
    "resolve_device",
    "start_ranks",
    "start_tiers",
    "weights_identity",
]

logger = logging.getLogger("cp_infer")

#: ``--dtype``: the weights' and the math's dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(g: argparse.ArgumentParser) -> None:
    """The model, its layout and how it runs: shared by ``generate`` and ``serve``."""
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", type=Path, metavar="PATH",
        help="a Hugging Face Llama or Mixtral directory (config.json + *.safetensors), a "
        "megatron-core torch_dist checkpoint, or a llama.cpp GGUF file (model.gguf: its "
        "tokenizer and chat template come with it); see docs/checkpoints.md. Detected from "
        "its files",
    )  # fmt: skip
    config_only = sorted(set(PRESETS) - set(RUNNABLE_PRESETS))
    src.add_argument(
        "--preset", choices=RUNNABLE_PRESETS,
        help="a debug model with random weights (seeded by --seed); the real shapes "
        f"({', '.join(config_only)}) are for the planner only",
    )  # fmt: skip
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--cp", type=int, default=1, help="context-parallel size (ring attention)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    g.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
        help="pad the vocabulary to a multiple of N * tp, as Megatron does (any vocabulary "
        "then splits over TP; padded ids are never sampled nor saved)",
    )  # fmt: skip
    g.add_argument(
        "--seed", type=int, default=0,
        help='the sampling seed of requests without a "seed" of their own, and the seed of '
        "preset weights. Each request samples from a generator of its own, so a request gives "
        "the same tokens in any batch, and the same as the server's with that seed",
    )  # fmt: skip
    g.add_argument(
        "--eos-id", type=int, nargs="+", metavar="ID",
        help="stop token(s); by default the eos_token_id of config.json (all, if a list)",
    )  # fmt: skip
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and math")
    g.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where the model runs (auto: this rank's GPU if CUDA is available, else the CPU); "
        "process groups use NCCL on CUDA and gloo on CPU",
    )  # fmt: skip
    g.add_argument(
        "--hardware", default="auto", metavar="NAME|PATH",
        help="the hardware model --variant auto (and serve's chunk sizing) weighs: a built-in "
        f"profile ({', '.join(sorted(PROFILES))}), a profile measured by `python -m cp_infer "
        "calibrate`, or auto (h100-rdma on CUDA, cpu-gloo on CPU)",
    )  # fmt: skip
    g.add_argument(
        "--kernel", choices=["auto", *sorted(KERNELS)], default="auto",
        help="local attention kernel (flash_attn and transformer_engine need CUDA)",
    )  # fmt: skip
    g.add_argument(
        "--decode-exchange", choices=list(EXCHANGES), default="auto",
        help="how decode's small per-layer collectives travel: the attention partials over CP "
        "and the TP sums (auto: shared memory among the ranks of one CPU host, else the "
        "process group's collectives; tools/bench_collectives.py measures them)",
    )  # fmt: skip
    g.add_argument(
        "--quant", choices=["none", "fp8"], default="none",
        help="fp8: the --fp8-layers linear layers in float8 e4m3, weights row-wise (one scale per "
        "output channel) and activations per token, as the paper serves 405B; the embedding, "
        "norms, router and LM head stay in --dtype",
    )  # fmt: skip
    g.add_argument(
        "--fp8-layers", nargs="+", choices=list(FP8_LAYERS), default=["ffn"], metavar="GROUP",
        help=f"which linear layers --quant fp8 converts: {', '.join(FP8_LAYERS)} (the paper: ffn)",
    )  # fmt: skip
    g.add_argument(
        "--fp8-backend", choices=list(FP8_BACKENDS), default="auto",
        help="the FP8 matmul: torch (torch._scaled_mm, CPU and CUDA), transformer_engine (TE's "
        "FP8 GEMM, CUDA only), auto (TE on CUDA when installed, else torch)",
    )  # fmt: skip
    g.add_argument(
        "--kv-dtype", choices=list(KV_DTYPES), default="auto",
        help="KV cache dtype: auto is --dtype; fp8_e4m3 stores K/V in float8 with a scale per "
        "(head, token), and pass-KV sends them so (about half of bf16's bytes)",
    )  # fmt: skip
    g.add_argument(
        "--device-memory", default="auto", metavar="BYTES",
        help="memory one rank may use, e.g. 80GiB (auto: the GPU's, or this host's RAM shared "
        "by its ranks); requests whose weights + KV cache + activations exceed it are refused "
        "up front",
    )  # fmt: skip
    g.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")


def add_tier_arguments(g: argparse.ArgumentParser, command: str):
    """``--prefill LAYOUT --decode LAYOUT``: shared by ``generate`` and ``serve``."""
    tiers = g.add_argument_group(
        "disaggregated prefill and decode",
        "Run two tiers under one launcher (world size = both tiers' sizes, prefill ranks first):"
        " the prefill tier prefills a prompt and samples its first token, its KV moves to the "
        "decode tier resharded (point to point, FP8 as FP8), and the decode tier decodes the "
        "rest. --tp/--cp/--pp/--ep do not apply. E.g. torchrun --nproc-per-node 3 -m cp_infer "
        f"{command} --preset tiny-llama --prefill tp=1,cp=2 --decode tp=1 ...",
    )  # fmt: skip
    tiers.add_argument("--prefill", metavar="LAYOUT",
                       help="the prefill tier's layout: tp=N,cp=N,pp=N,ep=N (keys left out are 1)")  # fmt: skip
    tiers.add_argument("--decode", metavar="LAYOUT",
                       help="the decode tier's layout, the same keys: e.g. tp=2, or tp=1,cp=2")  # fmt: skip
    tiers.add_argument(
        "--disagg-min-tokens", type=int, default=1024, metavar="N",
        help="with --prefill/--decode: a request with at least N new tokens (beyond what the "
        "decode tier has cached) is prefilled by the prefill tier; shorter ones, and any the "
        "prefill tier's KV pool cannot hold, prefill on the decode tier, beside its decodes",
    )  # fmt: skip
    return tiers


def model_config(args) -> tuple[ModelConfig, int | tuple[int, ...] | None, str | None]:
    """(config, EOS ids, checkpoint format or None for a preset) of ``--checkpoint`` or
    ``--preset`` (and ``--eos-id``)."""
    if args.preset:
        return get_preset(args.preset), tuple(args.eos_id) if args.eos_id else None, None
    fmt = detect_format(args.checkpoint)
    cfg, hf = read_config(args.checkpoint, fmt)
    eos = tuple(args.eos_id) if args.eos_id is not None else (hf or {}).get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else eos  # instruct models list several
    return cfg, eos, fmt


def resolve_device(name: str) -> torch.device:
    """``auto``: this rank's GPU (``LOCAL_RANK``) if CUDA is available, else the CPU.

    Raises:
        ValueError: ``cuda`` asked for on a machine without it.
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "--device cuda needs a CUDA GPU and a CUDA build of torch; use --device cpu"
        )
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def parse_ring_min_tokens(value: str) -> int | str:
    """``--ring-min-tokens``: a token count >= 0, or ``auto``."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(
            f"expected a token count >= 0 or 'auto', got {value!r} (0 puts every request on "
            "the ring)"
        )
    return n


def hardware_profile(spec: str) -> Profile | None:
    """``--hardware``: None for auto, a built-in profile by name, or a calibrated JSON file
    (:func:`cp_infer.hardware.profile`: any other name is an error)."""
    return None if spec == "auto" else profile(spec)


def memory_plan(args, cfg: ModelConfig, *, context: int, batch: int, device_bytes: int):
    """The planner's per-rank bytes for the layout, dtypes and quantization of these arguments."""
    kv = "fp8_e4m3" if args.kv_dtype == "fp8_e4m3" else str(DTYPES[args.dtype]).split(".")[-1]
    return plan_memory(
        cfg, tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep, context=context, batch=batch,
        dtype_bytes=DTYPES[args.dtype].itemsize, quant=args.quant,
        fp8_layers=tuple(args.fp8_layers), kv_dtype=kv, device_bytes=device_bytes,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
    )  # fmt: skip


def start_ranks(args, argv: list[str], store=None) -> torch.device:
    """Check the launch, then join the default process group (NCCL on CUDA, else gloo), at
    ``store`` if given (else at MASTER_ADDR:MASTER_PORT).

    Returns:
        this rank's device.
    """
    try:  # pure checks of the arguments, before any process group: every rank fails alike
        if not 0 < args.timeout < float("inf"):
            raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
        ensure_launched(argv, tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep)
        device = resolve_device(args.device)
    except ValueError as e:
        raise RankFailure(str(e)) from e
    init_distributed("nccl" if device.type == "cuda" else "gloo", timeout_s=args.timeout,
                     store=store)  # fmt: skip
    if dist.get_rank() == 0:
        clear_failure()
    return device


def _tier_args(args) -> tuple[dict[str, int], dict[str, int]]:
    """``--prefill`` and ``--decode``, checked (pure: every rank fails alike)."""
    if args.prefill is None or args.decode is None:
        raise ValueError("--prefill and --decode go together: give both tiers' layouts, e.g. "
                         "--prefill tp=1,cp=2 --decode tp=1")  # fmt: skip
    if (args.tp, args.cp, args.pp, args.ep) != (1, 1, 1, 1):
        raise ValueError("--tp/--cp/--pp/--ep do not apply with --prefill/--decode: put the "
                         "sizes in the tiers' layouts, e.g. --prefill tp=2,cp=2")  # fmt: skip
    if getattr(args, "save_logits", None) is not None or getattr(args, "logprobs", None):
        raise ValueError("--save-logits and --logprobs are not given with --prefill/--decode "
                         "(the prefill tier samples the first token): run without the tiers")  # fmt: skip
    if args.disagg_min_tokens < 1:
        raise ValueError(f"--disagg-min-tokens must be >= 1, got {args.disagg_min_tokens}")
    return parse_tier("--prefill", args.prefill), parse_tier("--decode", args.decode)


def start_tiers(args, argv: list[str], store=None):
    """Check ``--prefill``/``--decode`` and the launch (pure: every rank of both tiers fails
    alike), then join this rank's tier. Returns the tiers, the device, and a copy of ``args``
    whose ``--tp/--cp/--pp/--ep`` are this rank's tier's."""
    try:
        prefill, decode = _tier_args(args)
        if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
            n = tier_size(prefill) + tier_size(decode)
            raise ValueError(f"two tiers need {n} processes: launch with `torchrun "
                             f"--standalone --nproc-per-node {n} -m cp_infer "
                             f"{shlex.join(argv)}`")  # fmt: skip
        tier_layout(prefill, decode, int(os.environ["WORLD_SIZE"]))
        device = resolve_device(args.device)
        if not 0 < args.timeout < float("inf"):
            raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    except ValueError as e:
        raise RankFailure(str(e)) from e
    tiers = init_tiers(prefill, decode, timeout_s=args.timeout, store=store,
                       backend="nccl" if device.type == "cuda" else "gloo")  # fmt: skip
    if dist.get_rank() == 0:
        clear_failure()
    targs = copy.copy(args)
    targs.tp, targs.cp, targs.pp, targs.ep = (tiers.tier.tp, tiers.tier.cp, tiers.tier.pp,
                                              tiers.tier.ep)  # fmt: skip
    return tiers, device, targs


def weights_identity(args) -> str:
    """What the weights an engine runs are, for a KV tier's fingerprint: the preset and seed, or
    the checkpoint's sampled digest (:func:`~cp_infer.checkpoint.manifest.sampled_digest`), and
    what runs in FP8 (it changes the K/V)."""
    from cp_infer.checkpoint.manifest import sampled_digest

    source = (f"preset {args.preset} seed {args.seed}" if args.preset
              else f"checkpoint {sampled_digest(args.checkpoint)}")  # fmt: skip
    quant = f"fp8 {','.join(args.fp8_layers)}" if args.quant == "fp8" else "none"
    return f"{source}; quant {quant}"


def build_model(
    args, cfg: ModelConfig, checkpoint_format: str | None, pg: ParallelGroups, device: torch.device
):
    """This rank's shard of the model, weights loaded (``--preset`` or ``--checkpoint``)."""
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.parallel import parallelize

    model = parallelize(
        cfg, pg, DTYPES[args.dtype],
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, device=device,
        exchange=args.decode_exchange, timeout_s=args.timeout,
    )  # fmt: skip
    where = f"random weights (seed {args.seed})" if args.preset else str(args.checkpoint)
    logger.info("loading weights: %s", where)
    if args.preset:
        source = RandomSource(args.seed, cfg)
    else:
        verify_manifest(args.checkpoint, part=pg.rank, parts=pg.world_size, progress=pg.rank == 0)
        source = open_source(args.checkpoint, checkpoint_format, cfg)
    load_weights(model, source, progress=pg.rank == 0)
    groups = tuple(args.fp8_layers) if args.quant == "fp8" else ()
    if args.checkpoint is not None and checkpoint_format == "hf":
        stored = fp8_checkpoint_layers(json.loads((args.checkpoint / "config.json").read_text()))
        if stored:
            logger.info("FP8 checkpoint: its %s layers run in FP8", "+".join(stored))
            groups = tuple(dict.fromkeys(groups + stored))
    if groups:
        quantize_model(model, groups, backend=args.fp8_backend)
    return model
