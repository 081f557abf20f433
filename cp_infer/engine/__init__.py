"""Inference engine: a scheduler that builds each step's batch, a model runner that runs it on
this rank's stage, the CP-sharded KV cache, the attention of prefill and decode, sampling, and
generation as a client of them."""

from cp_infer.engine.batch import StepBatch
from cp_infer.engine.generate import Conversation, GenerationResult, generate
from cp_infer.engine.kv_cache import KVCache, StorePlan, decode_owner
from cp_infer.engine.runner import ModelRunner
from cp_infer.engine.sampling import SamplingConfig, sample
from cp_infer.engine.scheduler import Scheduler, SequenceState

__all__ = [
    "Conversation",
    "GenerationResult",
    "KVCache",
    "ModelRunner",
    "SamplingConfig",
    "Scheduler",
    "SequenceState",
    "StepBatch",
    "StorePlan",
    "decode_owner",
    "generate",
    "sample",
]
