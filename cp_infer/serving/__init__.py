"""Serving: an HTTP front end in a process of its own (OpenAI's and Megatron's APIs) over the
engine core that every rank runs, batch by batch, reusing the KV cache earlier requests left on
the CP ranks."""

from cp_infer.serving.loop import ServeLoop

__all__ = ["ServeLoop"]
