"""``python -m cp_infer plan-memory``: does a model fit a layout at a context length?"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cp_infer.entrypoints.launch import HelpFormatter, add_common_arguments
from cp_infer.models.config import PRESETS, get_preset
from cp_infer.planner import KV_DTYPES, parse_bytes, plan_host_tier, plan_memory
from cp_infer.quant import FP8_LAYERS
from cp_infer.reporting import format_table, write_json
from parallel_state import check_head_split

__all__ = ["add_parser", "run"]

logger = logging.getLogger("cp_infer")

_DESCRIPTION = """\
Per-rank bytes of weights, KV cache and peak prefill activations for a model and a layout, and
whether they fit the device. Pure arithmetic: it runs for the real shapes on any machine.

  python -m cp_infer plan-memory --preset llama3-405b --tp 8 --cp 16 --context 1048576 \\
      --quant fp8 --kv-dtype fp8_e4m3 --device-memory 80GiB --json plan.json

With --host-memory it also plans a host-memory KV tier (serve --kv-tier host): how many
conversations of --context tokens a host's RAM holds, and reading one back against prefilling
it again (the --hardware model's TTFT):

  python -m cp_infer plan-memory --preset llama3-405b --tp 8 --context 131072 --quant fp8 \\
      --kv-dtype fp8_e4m3 --host-memory 1536GiB --host-bandwidth 200GB
"""

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "plan-memory", help="per-rank memory of a layout at a context length",
        description=_DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model shape by name")
    src.add_argument("--checkpoint", type=Path, metavar="DIR", help="read the shape from here")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--cp", type=int, default=1, help="context-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    g.add_argument("--context", type=int, required=True, help="tokens per sequence")
    g.add_argument("--batch", type=int, default=1, help="sequences")
    g.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default="bfloat16",
                   help="weights and activations")  # fmt: skip
    g.add_argument("--quant", choices=["none", "fp8"], default="none", help="as generate's")
    g.add_argument("--fp8-layers", nargs="+", choices=list(FP8_LAYERS), default=["ffn"],
                   metavar="GROUP", help="as generate's")  # fmt: skip
    g.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="bfloat16",
                   help="KV cache dtype")  # fmt: skip
    g.add_argument(
        "--device-memory", default="80GiB",
        help="bytes per rank (e.g. 80GiB), or a --hardware profile's device: h100-rdma, "
        "h100-tcp, cpu-gloo or a calibrated JSON (the hardware model's registry)",
    )  # fmt: skip
    tier = g.add_argument_group("a host-memory KV tier (serve --kv-tier host)")
    tier.add_argument("--host-memory", metavar="SIZE",
                      help="host RAM per host given to the tier (e.g. 1536GiB)")  # fmt: skip
    tier.add_argument(
        "--host-bandwidth", default="200GB", metavar="BYTES",
        help="bytes per second a host reads its share of a conversation back at (its memory "
        "or its host-to-device links, whichever is slower; default 200GB: 8 PCIe Gen5 x16 "
        "links at ~25 GB/s each)",
    )  # fmt: skip
    tier.add_argument(
        "--hardware", default="h100-rdma",
        help="the hardware model whose TTFT is the re-prefill (h100-rdma, h100-tcp, cpu-gloo, "
        "or a calibrated JSON)",
    )  # fmt: skip
    g.add_argument("--json", type=Path, metavar="PATH", help="also write the plan as JSON")
    add_common_arguments(g)
    g.set_defaults(run=run)
    return g


def _config(args):
    if args.preset:
        return get_preset(args.preset)
    from cp_infer.checkpoint.formats import detect_format, read_config

    return read_config(args.checkpoint, detect_format(args.checkpoint))[0]


def _device_bytes(spec: str) -> int:
    """``--device-memory``: a size, or the memory of a hardware profile's device."""
    from cp_infer.hardware import PROFILES, profile

    if spec in PROFILES or spec.endswith(".json"):
        return int(profile(spec).memory_bytes)
    return parse_bytes(spec)


def run(args, argv: list[str]) -> int:
    cfg = _config(args)
    for name in ("tp", "cp", "pp", "ep"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_head_split(cfg.n_heads, cfg.n_kv_heads, args.tp)
    if cfg.is_moe and cfg.n_experts % args.ep:
        raise ValueError(f"n_experts={cfg.n_experts} is not divisible by --ep {args.ep}")
    plan = plan_memory(
        cfg, tp=args.tp, cp=args.cp, pp=args.pp, ep=args.ep, context=args.context,
        batch=args.batch, dtype_bytes=_DTYPE_BYTES[args.dtype], quant=args.quant,
        fp8_layers=tuple(args.fp8_layers), kv_dtype=args.kv_dtype,
        device_bytes=_device_bytes(args.device_memory),
    )  # fmt: skip
    gib = 2**30
    rows = [[name, f"{getattr(plan, key) / gib:.2f}"] for name, key in (
        ("weights", "weight_bytes"), ("KV cache", "kv_cache_bytes"),
        ("activations (peak prefill layer)", "activation_bytes"), ("total", "total_bytes"),
        ("device", "device_bytes"))]  # fmt: skip
    print(f"{cfg.name}: tp={args.tp} cp={args.cp} pp={args.pp} ep={args.ep}, "
          f"{args.batch} x {args.context} tokens, weights {args.dtype}"
          f"{' + fp8 ' + '+'.join(args.fp8_layers) if args.quant == 'fp8' else ''}, "
          f"KV {args.kv_dtype}, per rank:")  # fmt: skip
    print(format_table(["", "GiB"], rows))
    print("fits" if plan.fits else "does NOT fit: raise --cp/--tp/--pp, or use --quant fp8 / "
          "--kv-dtype fp8_e4m3")  # fmt: skip
    out = plan.to_dict()
    if args.host_memory is not None:
        out["host_tier"] = _host_tier(args, cfg).to_dict()
    if args.json:
        write_json(args.json, out)
    return 0


def _host_tier(args, cfg):
    """The host-memory tier's plan, printed."""
    from cp_infer.costmodel import plan_prefill
    from cp_infer.hardware import profile

    prof = profile(args.hardware)
    prefill = plan_prefill(cfg, prof, cp=args.cp, context=args.context, tp=args.tp,
                           bytes_per_element=_DTYPE_BYTES[args.dtype], quant=args.quant,
                           kv_dtype=args.kv_dtype)  # fmt: skip
    t = plan_host_tier(
        cfg, tp=args.tp, cp=args.cp, pp=args.pp, context=args.context, kv_dtype=args.kv_dtype,
        host_memory=parse_bytes(args.host_memory), host_bytes_s=parse_bytes(args.host_bandwidth),
        devices_per_host=prof.devices_per_host, prefill_s=prefill.ttft_s,
    )  # fmt: skip
    gib = 2**30
    print(f"\nhost-memory KV tier, {args.context}-token conversations, KV {args.kv_dtype}:")
    print(format_table(["", "value"], [
        ["one conversation (all hosts)", f"{t.entry_bytes / gib:.2f} GiB"],
        ["hosts of the layout", str(t.hosts)],
        ["per host", f"{t.host_bytes / gib:.2f} GiB"],
        [f"conversations in {args.host_memory} a host", str(t.conversations)],
        ["read back", f"{t.read_s:.3f} s"],
        [f"prefill again ({prof.name})", f"{t.prefill_s:.2f} s"],
        ["read back is faster by", f"{t.speedup:.0f}x"],
    ]))  # fmt: skip
    return t
