"""Inference engine: the engine core every front door drives (continuous batching, prefix
reuse), the scheduler that builds each step's batch, the model runner that runs it on this
rank's stage, the CP-sharded KV cache, the attention of prefill and decode, sampling, and
offline generation as a client of the core."""

from cp_infer.engine.batch import StepBatch
from cp_infer.engine.core import EngineCore, Outcome, Request, check_request
from cp_infer.engine.generate import Conversation, GenerationResult, generate
from cp_infer.engine.kv_cache import KVCache, StorePlan, decode_owner
from cp_infer.engine.runner import ModelRunner, StepOutput
from cp_infer.engine.sampling import SamplingConfig, sample
from cp_infer.engine.scheduler import Scheduler, SequenceState

__all__ = [
    "Conversation",
    "EngineCore",
    "GenerationResult",
    "KVCache",
    "ModelRunner",
    "Outcome",
    "Request",
    "SamplingConfig",
    "Scheduler",
    "SequenceState",
    "StepBatch",
    "StepOutput",
    "StorePlan",
    "check_request",
    "decode_owner",
    "generate",
    "sample",
]
