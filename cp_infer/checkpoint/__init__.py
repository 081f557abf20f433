"""Checkpoint loading: Hugging Face safetensors (sliced per rank) and seeded random weights."""

from cp_infer.checkpoint.hf import RandomSource, SafetensorsSource, hf_name, load_weights

__all__ = ["RandomSource", "SafetensorsSource", "hf_name", "load_weights"]
