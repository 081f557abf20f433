"""Plain-PyTorch Llama 3 (dense) and Mixtral-style (MoE) models, and their presets."""

from cp_infer.models.config import PRESETS, ModelConfig, RopeScaling, get_preset
from cp_infer.models.llama import ForwardContext, MoE, Transformer

__all__ = [
    "PRESETS",
    "ForwardContext",
    "MoE",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "get_preset",
]
