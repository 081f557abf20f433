"""Checkpoints: Hugging Face safetensors and megatron-core ``torch_dist``, read sliced per rank
and written tensor by tensor; ``SHA256SUMS`` manifests; seeded random weights for presets.

See docs/checkpoints.md for the formats and how names and layouts map.
"""

from cp_infer.checkpoint.formats import FORMATS, detect_format, open_source, read_config
from cp_infer.checkpoint.hf import RandomSource, SafetensorsSource, hf_name, load_weights
from cp_infer.checkpoint.megatron import MegatronSource, save_megatron

__all__ = [
    "FORMATS",
    "MegatronSource",
    "RandomSource",
    "SafetensorsSource",
    "detect_format",
    "hf_name",
    "load_weights",
    "open_source",
    "read_config",
    "save_megatron",
]
