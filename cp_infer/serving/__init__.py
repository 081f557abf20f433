"""Serving: an HTTP front end on rank 0 (OpenAI's and Megatron's APIs) over an engine that every
rank runs, batch by batch, reusing the KV cache earlier requests left on the CP ranks."""

from cp_infer.serving.engine import Outcome, PrefixCache, Request, ServeEngine, ServeLoop

__all__ = ["Outcome", "PrefixCache", "Request", "ServeEngine", "ServeLoop"]
