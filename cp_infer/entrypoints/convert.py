"""``python -m cp_infer convert``: Hugging Face <-> megatron-core checkpoints, and GGUF files to
either, tensor by tensor.

The input is verified against its ``SHA256SUMS`` (if it has one) and read one tensor at a time;
the output is written into a temporary directory beside the target, given its own
``SHA256SUMS``, and renamed into place only when complete, so a failed conversion leaves
nothing behind. Names and layouts: docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import secrets
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cp_infer.checkpoint.formats import FORMATS, detect_format, open_source, read_config
from cp_infer.checkpoint.hf import hf_name
from cp_infer.checkpoint.manifest import verify_manifest, write_manifest
from cp_infer.checkpoint.megatron import save_megatron
from cp_infer.checkpoint.safetensors_writer import TensorSpec, write_safetensors_checkpoint
from cp_infer.entrypoints.launch import HelpFormatter, add_common_arguments
from cp_infer.models.config import ModelConfig
from cp_infer.models.llama import Transformer

__all__ = ["add_parser", "convert", "run"]

logger = logging.getLogger("cp_infer")

#: Formats ``convert`` writes (GGUF is read only).
WRITABLE = ("hf", "megatron")

#: Files that travel with the weights unchanged.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)

_DESCRIPTION = """\
Convert a checkpoint between Hugging Face safetensors and megatron-core's distributed format
(torch_dist), or a llama.cpp GGUF file into either, in one process:

  python -m cp_infer convert --from hf --to megatron --input ./llama --output ./llama-mcore
  python -m cp_infer convert --from megatron --to hf --input ./llama-mcore --output ./llama-hf
  python -m cp_infer convert --from gguf --to hf --input model.gguf --output ./model-hf

A GGUF file's quantized tensors are dequantized (float32; F16 and BF16 tensors stay as they
are), its Q/K rows put back in Hugging Face's order, and its tokenizer, chat template and
BOS/EOS written as tokenizer.json, tokenizer_config.json and generation_config.json.

The output is written to a temporary directory and renamed when complete; it records a sha256
per file (SHA256SUMS), which generate and convert verify when loading.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    c = sub.add_parser(
        "convert",
        help="convert a checkpoint between Hugging Face and megatron-core formats",
        description=_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    c.add_argument("--from", dest="src", choices=FORMATS, required=True, help="input format")
    c.add_argument("--to", dest="dst", choices=WRITABLE, required=True, help="output format")
    c.add_argument(
        "--input", type=Path, required=True, metavar="PATH",
        help="the checkpoint: a directory, or a .gguf file",
    )  # fmt: skip
    c.add_argument("--output", type=Path, required=True, metavar="DIR", help="where to write")
    c.add_argument("--force", action="store_true", help="replace an existing --output")
    c.add_argument(
        "--max-shard-size", type=int, default=5 << 30, metavar="BYTES",
        help="largest safetensors file written (Hugging Face output)",
    )  # fmt: skip
    add_common_arguments(c)
    c.set_defaults(run=run)
    return c


def _check_args(args) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("convert runs in one process: start it with python, not a launcher")
    if args.src == args.dst:
        raise ValueError(f"--from and --to are both {args.src!r}: nothing to convert")
    found = detect_format(args.input)
    if found != args.src:
        raise ValueError(
            f"--input {args.input} is a {found} checkpoint, not {args.src}; use --from {found}"
        )
    out = args.output.resolve()
    if out == args.input.resolve() or args.input.resolve() in out.parents:
        raise ValueError(f"--output {args.output} lies inside --input; choose another directory")
    if args.output.exists() and not args.force:
        raise ValueError(f"--output {args.output} exists; pass --force to replace it")
    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"--output {args.output} is a file; give a directory")
    if args.max_shard_size < 1:
        raise ValueError(f"--max-shard-size must be >= 1 byte, got {args.max_shard_size}")


def _parameters(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Our full parameter names and shapes (one copy of a tied embedding)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return [
        (name, tuple(p.shape))
        for name, p in model.named_parameters()
        if not (cfg.tie_embeddings and name == "output.weight")
    ]


def convert(args) -> dict:
    """Convert ``args.input`` into ``args.output``; returns what it measured."""
    t0 = time.perf_counter()
    _check_args(args)
    verify_manifest(args.input, progress=True)
    cfg, hf = read_config(args.input, args.src)
    params = _parameters(cfg)
    rss_before = _peak_rss()  # what the conversion itself adds is measured from here
    tmp = args.output.parent / f".{args.output.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        with open_source(args.input, args.src, cfg, streaming=True) as source:
            unit = "tensor" if args.dst == "hf" else "chunk"
            bar = tqdm(
                total=_count(cfg, params, args.dst), desc=f"{args.src} -> {args.dst}", unit=unit
            )
            with bar:
                if args.dst == "hf":
                    _write_hf(tmp, cfg, hf, params, source, bar, args.max_shard_size)
                else:
                    _write_megatron(tmp, cfg, hf, params, source, bar)
        if args.src == "gguf":
            _write_gguf_tokenizer(args.input, tmp)
        for name in SIDE_FILES:
            if (args.input / name).is_file():
                shutil.copy2(args.input / name, tmp / name)
        write_manifest(tmp)
        _replace(tmp, args.output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats = {
        "tensors": len(params),
        "bytes": sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file()),
        "largest_tensor_bytes": max(_numel(s) for _, s in params) * 4,
        "peak_rss_bytes": _peak_rss(),
        "peak_rss_growth_bytes": _peak_rss() - rss_before,
        "seconds": time.perf_counter() - t0,
    }
    logger.info(
        "converted %s (%s) to %s (%s): %d tensors, %.1f MiB in %.1f s, peak memory %.0f MiB "
        "(+%.0f MiB over the process before converting; largest tensor %.0f MiB)",
        args.input, args.src, args.output, args.dst, stats["tensors"], stats["bytes"] / 2**20,
        stats["seconds"], stats["peak_rss_bytes"] / 2**20, stats["peak_rss_growth_bytes"] / 2**20,
        stats["largest_tensor_bytes"] / 2**20,
    )  # fmt: skip
    return stats


def _write_gguf_tokenizer(path: Path, out: Path) -> None:
    """A GGUF file's tokenizer as Hugging Face's files (none when it has no vocabulary)."""
    from cp_infer.checkpoint.formats import has_tokenizer
    from cp_infer.checkpoint.gguf_tokenizer import gguf_tokenizer

    if has_tokenizer(path):
        written = gguf_tokenizer(path).save(out)
        logger.info("wrote the GGUF tokenizer as %s", ", ".join(written))


def _peak_rss() -> int:
    """High-water mark of this process's resident memory, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _count(cfg: ModelConfig, params, dst: str) -> int:
    """Steps of the progress bar: tensors written (HF), or chunks (megatron: fused per layer)."""
    if dst == "hf":
        return len(params)
    per_layer = 4 + (1 + 2 * cfg.n_experts if cfg.is_moe else 2)
    return 3 - cfg.tie_embeddings + cfg.n_layers * per_layer


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` onto ``output`` (an old ``output`` goes only after that)."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{secrets.token_hex(4)}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old)


def _write_hf(tmp: Path, cfg, hf, params, source, bar, max_shard_bytes: int) -> None:
    import json

    config = hf if hf is not None else cfg.to_hf()
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    specs = [TensorSpec(hf_name(p, cfg), source.dtype(p), shape) for p, shape in params]
    by_hf = {hf_name(p, cfg): (p, shape) for p, shape in params}

    def fetch(name: str) -> torch.Tensor:
        p, shape = by_hf[name]
        return source.read(p, None, shape).to(source.dtype(p))

    write_safetensors_checkpoint(
        tmp, specs, fetch, max_shard_bytes=max_shard_bytes, on_tensor=lambda _: bar.update()
    )


def _write_megatron(tmp: Path, cfg, hf, params, source, bar) -> None:
    shapes = dict(params)
    save_megatron(
        tmp, cfg, hf,
        read=lambda p: source.read(p, None, shapes[p]).to(source.dtype(p)),
        dtype=source.dtype,
        on_chunk=lambda chunk: bar.update(),
    )  # fmt: skip


def run(args, argv: list[str]) -> int:
    convert(args)
    return 0
