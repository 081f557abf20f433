"""Plain-PyTorch Llama 3 (dense) and Mixtral-style (MoE) models, and their presets.

The configurations (:mod:`cp_infer.models.config`) are torch-free; the modules
(:mod:`cp_infer.models.llama`) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from cp_infer.models.llama import ForwardContext, MoE, Transformer
