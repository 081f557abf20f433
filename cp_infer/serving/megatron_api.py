"""Megatron-LM's text generation API, ``PUT /api``, over the frontend.

The fields and defaults of Megatron-LM's server (:class:`~cp_infer.serving.protocol
.MegatronRequest`); errors are a bare message, as there. ``random_seed: -1`` (the default)
draws fresh randomness per request. The answer holds every prompt's tokens with the generated
ones after them, their text, per-token segments and, with ``logprobs``, the log-probability of
every token after the first.
"""

from __future__ import annotations

import asyncio

from fastapi import Request as HttpRequest

from cp_infer.engine.params import SamplingConfig
from cp_infer.engine.request import Outcome
from cp_infer.serving.frontend import BadRequest, Frontend, Pending, fresh_seed
from cp_infer.serving.http_util import failure_response, unless_disconnected
from cp_infer.serving.openai_api import LOGPROB_FLOOR
from cp_infer.serving.protocol import MegatronRequest

__all__ = ["MegatronServing"]


class MegatronServing:
    """``PUT /api`` of one frontend."""

    def __init__(self, front: Frontend) -> None:
        self.front = front

    def _requests(self, req: MegatronRequest):
        front = self.front
        bos = getattr(front.tokenizer, "bos_token_id", None) if front.tokenizer else None
        if req.add_BOS and bos is None:
            raise BadRequest("add_BOS: this checkpoint's tokenizer has no BOS token")
        eos = {req.stop_token} if req.stop_token is not None else set(front.eos_ids)
        if any(t >= front.vocab_size for t in eos):
            raise BadRequest(f"stop_token {req.stop_token} is outside the vocabulary")
        seed = req.random_seed if req.random_seed >= 0 else fresh_seed()
        cfg = SamplingConfig(  # 0 tokens (scoring): run 1 and drop it
            max_new_tokens=max(req.tokens_to_generate, 1), temperature=req.temperature,
            top_k=req.top_k, top_p=req.top_p if req.top_p > 0 else 1.0, seed=seed,
            eos_id=tuple(eos) or None,
        )  # fmt: skip
        prompts = [  # Megatron's server: no special tokens but the BOS that add_BOS asks for
            ([bos] if req.add_BOS else []) + front.encode(p, "prompts", special=False)
            for p in req.prompts
        ]
        return [
            front.make_request(t, cfg, logprobs=req.logprobs, budget="tokens_to_generate")
            for t in prompts
        ]

    async def _finish(self, pending: Pending) -> tuple[list[int], Outcome]:
        tokens = []
        while True:
            ev = await pending.events.get()
            if isinstance(ev, Outcome):
                return tokens, ev
            tokens.append(ev)  # Megatron's requests ask no alternatives: ids only

    async def generate(self, http: HttpRequest, req: MegatronRequest):
        front = self.front
        requests = self._requests(req)
        pending = front.submit(requests)

        async def whole():
            results = await asyncio.gather(*(self._finish(p) for p in pending))
            failed = next((o for _, o in results if o.error is not None), None)
            if failed is not None:
                front.cancel_all(pending)
                return failure_response(http, failed)
            keep = req.tokens_to_generate
            full = [
                list(r.tokens) + o.tokens[:keep]
                for r, (_, o) in zip(requests, results, strict=True)
            ]
            logprobs = None
            if req.logprobs:  # of every token after the first, prompt and generation
                logprobs = [
                    [max(v, LOGPROB_FLOOR) for v in o.logprobs[: len(t) - 1]]
                    for (_, o), t in zip(results, full, strict=True)
                ]
            return {
                "text": [front.decode(t) for t in full],
                "segments": [[front.decode([x]) for x in t] for t in full],
                "logprobs": logprobs,
                "tokens": full,
            }

        return await unless_disconnected(http, whole, lambda: front.cancel_all(pending))
