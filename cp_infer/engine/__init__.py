"""Inference engine: sharded KV cache, prefill/decode attention, generation loop, sampling."""

from cp_infer.engine.generate import Conversation, GenerationResult, generate
from cp_infer.engine.kv_cache import KVCache, decode_owner
from cp_infer.engine.sampling import SamplingConfig, sample

__all__ = [
    "Conversation",
    "GenerationResult",
    "KVCache",
    "SamplingConfig",
    "decode_owner",
    "generate",
    "sample",
]
