"""Checkpoints: Hugging Face safetensors and megatron-core ``torch_dist``, read sliced per rank
and written tensor by tensor; ``SHA256SUMS`` manifests; seeded random weights for presets.

See docs/checkpoints.md for the formats and how names and layouts map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cp_infer._lazy import lazy_exports

# name -> its module: loaded on first use (the tokenizer side needs no torch)
_WHERE = {
    "FORMATS": "formats", "detect_format": "formats", "open_source": "formats",
    "read_config": "formats", "RandomSource": "hf", "SafetensorsSource": "hf", "hf_name": "hf",
    "load_weights": "hf", "MegatronSource": "megatron", "save_megatron": "megatron",
}  # fmt: skip

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


__getattr__ = lazy_exports(__name__, _WHERE, globals())


if TYPE_CHECKING:
    from cp_infer.checkpoint.formats import FORMATS, detect_format, open_source, read_config
    from cp_infer.checkpoint.hf import RandomSource, SafetensorsSource, hf_name, load_weights
    from cp_infer.checkpoint.megatron import MegatronSource, save_megatron
