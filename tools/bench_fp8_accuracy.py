#!/usr/bin/env python
"""Measure what FP8 costs in accuracy: logits error and greedy agreement against fp32 and bf16.

For each model (random weights, seeded), the same prompt runs through the unsharded model in
each mode: fp32 (the reference), bf16, FP8 FFN (the paper's choice), FP8 FFN + attention. The
table gives, per mode, the largest logit error over every prompt position relative to the
largest fp32 logit (against fp32 and against bf16), and how many of 32 greedy tokens match
fp32's. ``--outliers`` also runs each model with a few hidden channels scaled up 30x in the
embedding, the activation outliers real LLMs have and per-token quantization must survive.

Example (the figures in docs/performance.md)::

    python tools/bench_fp8_accuracy.py --presets tiny-llama tiny-moe small-llama --outliers \\
        --json bench_out/fp8_accuracy.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.attention.kernels import torch_cpu_flash
from cp_infer.checkpoint import RandomSource, load_weights
from cp_infer.models import Transformer, get_preset
from cp_infer.models.llama import ForwardContext
from cp_infer.quant import quantize_model
from cp_infer.reporting import format_table, write_json

logger = logging.getLogger("bench_fp8_accuracy")

MODES = {  # name: (dtype, FP8 layer groups)
    "fp32": (torch.float32, ()),
    "bf16": (torch.bfloat16, ()),
    "fp8-ffn": (torch.float32, ("ffn",)),
    "fp8-ffn+attn": (torch.float32, ("ffn", "attention")),
}


def _attention(q, k, v, layer):
    out, _ = torch_cpu_flash(q[None], k[None], v[None], True)
    return out[0]


@torch.no_grad()
def _logits(model, tokens: list[int]) -> torch.Tensor:
    t = torch.tensor(tokens)
    ctx = ForwardContext(positions=torch.arange(len(tokens)), attention=_attention)
    return model.logits(model(t, ctx)).float()


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def _models(preset: str, outliers: bool) -> dict[str, Transformer]:
    cfg = get_preset(preset)
    base = Transformer(cfg)
    load_weights(base, RandomSource(0, cfg))
    if outliers:  # a few hidden channels 30x larger in every token, as in real LLMs
        g = torch.Generator().manual_seed(1)
        channels = torch.randperm(cfg.dim, generator=g)[: max(2, cfg.dim // 64)]
        base.tok_embeddings.weight.data[:, channels] *= 30.0
    models = {}
    for name, (dtype, groups) in MODES.items():
        m = copy.deepcopy(base).to(dtype)
        if groups:
            quantize_model(m, groups)
        models[name] = m.eval()
    return models


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny-llama", "tiny-moe", "small-llama"])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--outliers", action="store_true", help="also with outlier channels")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    records = []
    for preset in args.presets:
        for outliers in [False, True] if args.outliers else [False]:
            models = _models(preset, outliers)
            vocab = models["fp32"].cfg.vocab_size
            g = torch.Generator().manual_seed(2)
            prompt = torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist()
            logits = {name: _logits(m, prompt) for name, m in models.items()}
            ref_greedy = _greedy(models["fp32"], prompt[:64], args.greedy_tokens)
            scale = logits["fp32"].abs().max()
            for name, m in models.items():
                same = sum(
                    a == b
                    for a, b in zip(
                        _greedy(m, prompt[:64], args.greedy_tokens), ref_greedy, strict=True
                    )
                )
                records.append({
                    "preset": preset, "outliers": outliers, "mode": name,
                    "err_vs_fp32": ((logits[name] - logits["fp32"]).abs().max() / scale).item(),
                    "err_vs_bf16": ((logits[name] - logits["bf16"]).abs().max() / scale).item(),
                    "greedy_match": same, "greedy_tokens": args.greedy_tokens,
                })  # fmt: skip
                logger.warning("%s outliers=%s %s: %s", preset, outliers, name, records[-1])
    rows = [
        [r["preset"], "yes" if r["outliers"] else "no", r["mode"], f"{r['err_vs_fp32']:.4f}",
         f"{r['err_vs_bf16']:.4f}", f"{r['greedy_match']}/{r['greedy_tokens']}"]
        for r in records
    ]  # fmt: skip
    cols = ["preset", "outliers", "mode", "err_vs_fp32", "err_vs_bf16", "greedy_vs_fp32"]
    print(format_table(cols, rows))
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
