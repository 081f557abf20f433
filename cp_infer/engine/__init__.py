"""Inference engine: the engine core every front door drives (continuous batching, prefix
reuse), the KV cache manager that keeps its books, the scheduler that builds each step's batch,
the model runner that runs it on this rank's stage, the CP-sharded KV cache, the attention of
prefill and decode, sampling, and offline generation as a client of the core.

The names below load on first use: a process that needs only the request types (the API
process: :mod:`cp_infer.engine.request`, :mod:`cp_infer.engine.params`) never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cp_infer._lazy import lazy_exports

_WHERE = {
    "StepBatch": "batch",
    "EngineCore": "core",
    "Outcome": "request",
    "Request": "request",
    "check_request": "request",
    "Conversation": "offline",
    "GenerationResult": "offline",
    "generate": "offline",
    "KVCache": "kv_cache",
    "StorePlan": "kv_cache",
    "decode_owner": "kv_cache",
    "KVCacheManager": "kv_manager",
    "ModelRunner": "runner",
    "StepOutput": "runner",
    "SamplingConfig": "params",
    "sample": "sampling",
    "Scheduler": "scheduler",
    "SequenceState": "scheduler",
}

__all__ = [
    "Conversation", "EngineCore", "GenerationResult", "KVCache", "KVCacheManager", "ModelRunner",
    "Outcome", "Request", "SamplingConfig", "Scheduler", "SequenceState", "StepBatch",
    "StepOutput", "StorePlan", "check_request", "decode_owner", "generate", "sample",
]  # fmt: skip


__getattr__ = lazy_exports(__name__, _WHERE, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from cp_infer.engine.batch import StepBatch
    from cp_infer.engine.core import EngineCore
    from cp_infer.engine.kv_cache import KVCache, StorePlan, decode_owner
    from cp_infer.engine.kv_manager import KVCacheManager
    from cp_infer.engine.offline import Conversation, GenerationResult, generate
    from cp_infer.engine.params import SamplingConfig
    from cp_infer.engine.request import Outcome, Request, check_request
    from cp_infer.engine.runner import ModelRunner, StepOutput
    from cp_infer.engine.sampling import sample
    from cp_infer.engine.scheduler import Scheduler, SequenceState
