"""Write a preset model with seeded random weights as a Hugging Face checkpoint directory.

For trying the checkpoint tools without a model hub::

    python examples/make_tiny_checkpoint.py --preset tiny-llama --output demo_out/tiny-llama-hf

The directory holds config.json and model.safetensors (loadable by transformers'
``AutoModelForCausalLM.from_pretrained``); the weights are the ones ``generate --preset`` uses.
It also gets a word-level tokenizer with a chat template (token ``i`` is the word ``w<i>``), so
text prompts and ``serve``'s chat API work; ``--no-tokenizer`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cp_infer.checkpoint import RandomSource, hf_name
from cp_infer.checkpoint.safetensors_writer import TensorSpec, write_safetensors_checkpoint
from cp_infer.models import RUNNABLE_PRESETS, Transformer, get_preset
from cp_infer.testing.tokenizer import write_word_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=RUNNABLE_PRESETS, default="tiny-llama")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false")
    args = p.parse_args()
    cfg = get_preset(args.preset)
    with torch.device("meta"):
        params = {n: tuple(t.shape) for n, t in Transformer(cfg).named_parameters()}
    source = RandomSource(args.seed, cfg)
    by_hf = {hf_name(n, cfg): n for n in params}
    specs = [TensorSpec(name, torch.float32, params[n]) for name, n in by_hf.items()]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    write_safetensors_checkpoint(
        args.output, specs, lambda name: source.read(by_hf[name], None, params[by_hf[name]])
    )
    if args.tokenizer:
        write_word_tokenizer(args.output, cfg.vocab_size)
    print(f"wrote {args.preset} ({cfg.n_params() / 1e6:.1f}M parameters) to {args.output}")


if __name__ == "__main__":
    main()
