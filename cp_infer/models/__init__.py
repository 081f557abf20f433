"""Plain-PyTorch Llama 3 (dense) and Mixtral-style (MoE) models, and their presets.

The configurations (:mod:`cp_infer.models.config`) are torch-free; the modules
(:mod:`cp_infer.models.llama`) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cp_infer._lazy import lazy_exports
from cp_infer.models.config import (
    PRESETS,
    RUNNABLE_PRESETS,
    ModelConfig,
    RopeScaling,
    get_preset,
    unsupported_hf_fields,
)

_LAZY = {"ForwardContext": "llama", "MoE": "llama", "Transformer": "llama"}

__all__ = [
    "PRESETS",
    "RUNNABLE_PRESETS",
    "ForwardContext",
    "MoE",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "get_preset",
    "unsupported_hf_fields",
]


__getattr__ = lazy_exports(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from cp_infer.models.llama import ForwardContext, MoE, Transformer
