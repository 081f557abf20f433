"""Plain-PyTorch Llama 3 (dense) and Mixtral-style (MoE) models, and their presets."""

from cp_infer.models.config import (
    PRESETS,
    RUNNABLE_PRESETS,
    ModelConfig,
    RopeScaling,
    get_preset,
    unsupported_hf_fields,
)
from cp_infer.models.llama import ForwardContext, MoE, Transformer

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
