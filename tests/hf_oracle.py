"""Hugging Face transformers as the oracle: random tiny Llama / Mixtral checkpoints and their outputs.

The checkpoints are made with ``save_pretrained`` (safetensors) from random weights, and the
reference logits and greedy tokens come from transformers' own forward pass (full recompute per
step: no generate() heuristics involved).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256
PROMPTS = {
    "len1": [17],
    "len5": [3, 141, 59, 26, 5],
    "len300": [(7 * i + 3) % VOCAB for i in range(300)],
    "len77": [(11 * i + 1) % VOCAB for i in range(77)],
}


def make_checkpoint(
    kind: str, directory: Path, seed: int = 0, vocab_size: int = VOCAB, rope_scaling: bool = True
) -> Path:
    """Save a random tiny ``llama`` or ``mixtral`` model to ``directory``.

    Args:
        rope_scaling: Llama 3 RoPE scaling for ``llama`` (plain RoPE if False, as megatron-core's
            GPTModel can only scale from 8192 positions).
    """
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        config = transformers.LlamaConfig(
            rope_theta=500000.0, rope_scaling=scaling if rope_scaling else None, **common
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "mixtral":
        config = transformers.MixtralConfig(
            rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2, **common
        )
        model = transformers.MixtralForCausalLM(config)
    else:
        raise ValueError(kind)
    # Random init leaves the norms at 1: perturb them so a wrong norm mapping shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@torch.no_grad()
def reference(directory: Path, prompts: dict[str, list[int]], max_new: int) -> dict:
    """Per prompt: the last prompt position's logits and ``max_new`` greedy tokens."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    model.eval()
    out = {}
    for name, ids in prompts.items():
        seq = list(ids)
        first_logits = None
        for _ in range(max_new):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            first_logits = logits if first_logits is None else first_logits
            seq.append(int(logits.argmax()))
        out[name] = {"logits": first_logits, "tokens": seq[len(ids) :]}
    return out
