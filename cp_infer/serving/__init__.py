"""Serving: an HTTP front end in a process of its own (OpenAI's and Megatron's APIs) over the
engine core that every rank runs, batch by batch, reusing the KV cache earlier requests left on
the CP ranks.

The API process imports only what it needs (no torch): :mod:`cp_infer.serving.api_process`.
The ranks' side is :class:`cp_infer.serving.loop.ServeLoop`.
"""
