"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` over the frontend.

A request becomes one engine request per prompt and choice: a completions prompt may be a
batch (a list of texts or of token-id lists), and each prompt gets ``n`` choices, numbered
prompt by prompt (prompt i's choice j has index ``i * n + j``) and seeded ``seed + j``, so a
prompt's choices are the same alone or in a batch. No seed: fresh randomness per request.
Answers stream as server-sent events or come whole; a client that leaves cancels its requests.

How a request ends, as a client sees it:

- ``finish_reason`` ``"stop"`` (an EOS, a stop token or a stop string) or ``"length"``;
- ``"abort"``: the server is stopping; a streamed answer gets that finish reason then
  ``[DONE]``, a whole one a 503;
- a failure (its sampling, or a rank): a streamed answer gets an ``error`` event, a whole one
  a 500 naming it. Other requests go on unless a rank failed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from cp_infer.engine.params import SamplingConfig
from cp_infer.engine.request import Outcome
from cp_infer.serving.frontend import BadRequest, Frontend, Pending, Reply, fresh_seed
from cp_infer.serving.http_util import (
    error_event,
    failure_response,
    merged,
    sse,
    unless_disconnected,
)
from cp_infer.serving.protocol import ChatRequest, CompletionRequest

__all__ = ["LOGPROB_FLOOR", "OpenAIServing"]

#: Log-probabilities are reported no lower than this (JSON has no -inf), as vLLM does.
LOGPROB_FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its tokens, and its text as sent (None for token ids)."""

    tokens: list[int]
    text: str | None = None


def completion_logprobs(
    front: Frontend, seq: list[int], first: int, logprobs: list[float], tops
) -> dict:
    """OpenAI's completions ``logprobs`` of ``seq[first:]`` (the answer, or with ``echo`` the
    prompt too, whose first token has no log-probability): each token's text, log-probability,
    most likely alternatives (the chosen one among them) and offset in the text."""
    texts = front.token_texts(seq, 0, seq[:1]) if first == 0 else []
    lps: list[float | None] = [None] * (first == 0) + [_lp(v) for v in logprobs]
    top: list[dict | None] = [None] * (first == 0)
    for i, lp, alts in zip(range(max(first, 1), len(seq)), logprobs, tops, strict=True):
        chosen, *names = front.token_texts(seq, i, [seq[i], *(t for t, _ in alts)])
        texts.append(chosen)
        alternatives = dict(zip(names, (_lp(v) for _, v in alts), strict=True))
        alternatives.setdefault(chosen, _lp(lp))
        top.append(alternatives)
    offsets = list(itertools.accumulate((len(x) for x in texts[:-1]), initial=0))
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(front: Frontend, seq: list[int], first: int, logprobs: list[float], tops):
    """OpenAI's chat ``logprobs`` of the answer ``seq[first:]``: per token, its text, bytes,
    log-probability and its ``top_logprobs`` most likely alternatives."""

    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode())}

    content = []
    for i, lp, alts in zip(range(first, len(seq)), logprobs, tops, strict=True):
        chosen, *names = front.token_texts(seq, i, [seq[i], *(t for t, _ in alts)])
        top = [entry(name, v) for name, (_, v) in zip(names, alts, strict=True)]
        content.append({**entry(chosen, lp), "top_logprobs": top})
    return {"content": content}


def _alternatives(req) -> int | None:
    """How many most likely tokens a request wants per position (None: no logprobs)."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def _request_usage(prompts: list[Prompt], outcomes: list[Outcome], completion: int) -> dict:
    """The usage of a whole request: each prompt counted once, every choice's tokens."""
    n_prompt = sum(len(p.tokens) for p in prompts)
    per_prompt = len(outcomes) // len(prompts)  # the first choice of each prompt says its cache
    cached = sum(o.cached_tokens for o in outcomes[::per_prompt])
    return {
        "prompt_tokens": n_prompt, "completion_tokens": completion,
        "total_tokens": n_prompt + completion, "prompt_tokens_details": {"cached_tokens": cached},
    }  # fmt: skip


class OpenAIServing:
    """The two OpenAI endpoints (``completion`` and ``chat``) of one frontend."""

    def __init__(self, front: Frontend) -> None:
        self.front = front

    # -- requests ---------------------------------------------------------------------------------
    def prompts(self, req: CompletionRequest) -> list[Prompt]:
        return [
            Prompt(p)
            if isinstance(p, list)
            else Prompt(self.front.encode(p, "prompt", special=req.add_special_tokens), p)
            for p in req.prompts
        ]

    def sampling(self, req, seed: int) -> SamplingConfig:
        front = self.front
        extra = req.stop_token_ids or []
        if any(t >= front.vocab_size for t in extra):
            raise BadRequest(
                f"stop_token_ids {extra}: ids must be below the vocabulary size {front.vocab_size}",
                "stop_token_ids",
            )
        if req.stops and front.tokenizer is None:
            raise BadRequest(
                "stop strings need the checkpoint's tokenizer: give stop_token_ids instead",
                "stop",
            )
        eos = set(extra) if req.ignore_eos else front.eos_ids | set(extra)
        budget = req.budget if isinstance(req, ChatRequest) else max(req.max_tokens, 1)
        return SamplingConfig(
            max_new_tokens=budget, temperature=req.temperature, top_p=req.top_p,
            top_k=max(req.top_k, 0), seed=seed, eos_id=tuple(sorted(eos)) or None,
            min_tokens=req.min_tokens,
        )  # fmt: skip

    async def serve(self, http: HttpRequest, req, prompts: list[Prompt], kind: str):
        """Queue ``n`` requests per prompt, then stream or answer."""
        front, k = self.front, _alternatives(req)
        requests = [
            front.make_request(
                p.tokens, self.sampling(req, fresh_seed() if req.seed is None else req.seed + j),
                logprobs=req.echo and k is not None, top_logprobs=k,
            )
            for p in prompts
            for j in range(req.n)  # n choices: n seeds
        ]  # fmt: skip
        pendings = front.submit(requests)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        of = [prompts[i // req.n] for i in range(len(pendings))]  # each choice's prompt
        if req.stream:
            events = self.stream(pendings, prompts, of, rid,
                                 obj + (".chunk" if kind == "chat" else ""), kind, req)  # fmt: skip
            return StreamingResponse(events, media_type="text/event-stream")

        async def whole():
            results = await asyncio.gather(
                *(self.choice(i, p, of[i], kind, req) for i, p in enumerate(pendings))
            )
            failed = [o for c, o, _ in results if c is None]
            if failed:
                front.cancel_all(pendings)  # the other choices are of no use now
                return failure_response(http, failed[0])
            completion = sum(n for _, _, n in results)
            return {
                "id": rid, "object": obj, "created": int(time.time()), "model": front.model_name,
                "choices": [c for c, _, _ in results],
                "usage": _request_usage(prompts, [o for _, o, _ in results], completion),
            }  # fmt: skip

        return await unless_disconnected(http, whole, lambda: front.cancel_all(pendings))

    def echoed(self, prompt: Prompt) -> str | None:
        """The prompt as ``echo`` returns it: as sent, or its ids decoded."""
        return prompt.text if prompt.text is not None else self.front.decode(prompt.tokens)

    async def choice(self, i: int, pending: Pending, prompt: Prompt, kind: str, req):
        """Choice ``i`` whole: (its JSON or None if it failed, its outcome, its token count)."""
        front, k, tokens = self.front, _alternatives(req), prompt.tokens
        reply = Reply(front, pending, req.stops, req.min_tokens,
                      skip_special=req.skip_special_tokens)  # fmt: skip
        pieces = [piece async for _, piece, _ in reply.pieces()]
        o = await reply.finished()
        if o.error is not None and not reply.stopped:
            return None, o, 0
        scoring = kind == "completion" and req.max_tokens == 0  # 1 token ran, dropped
        answer = [] if scoring else reply.tokens
        if req.stops and answer == reply.tokens:
            text = "".join(pieces) + reply.rest()
        else:  # the whole answer decoded at once (no piecewise approximation)
            text = front.continuation(tokens, answer, skip_special=req.skip_special_tokens)
        logprobs = None
        if k is not None:  # the prompt's (echo), then those of the tokens kept
            n = (len(tokens) - 1) * req.echo + len(answer)
            first = 0 if req.echo else len(tokens)
            shown = (front, tokens + answer, first, o.logprobs[:n], o.top_logprobs[:n])
            logprobs = chat_logprobs(*shown) if kind == "chat" else completion_logprobs(*shown)
        if req.echo and text is not None:
            text = self.echoed(prompt) + text
        c = {"index": i, "logprobs": logprobs, "finish_reason": reply.finish_reason,
             "token_ids": answer}  # fmt: skip
        if kind == "chat":
            c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        return c, o, len(answer)

    # -- streaming ------------------------------------------------------------------------------
    async def stream(self, pendings: list[Pending], prompts: list[Prompt], of: list[Prompt],
                     rid: str, obj: str, kind: str, req):  # fmt: skip
        """The server-sent events of every choice (``of[i]``: choice i's prompt)."""
        front, created = self.front, int(time.time())
        replies = [
            Reply(front, p, req.stops, req.min_tokens, skip_special=req.skip_special_tokens)
            for p in pendings
        ]

        def chunk(i, delta, finish=None, token=None):
            c = {"index": i, "finish_reason": finish}
            if kind == "chat":
                c["delta"] = delta
            else:
                c.update(text=delta.get("content", ""), logprobs=None)
            if token is not None:  # an extension: the id, for clients without the tokenizer
                c["token_ids"] = [token]
            out = {"id": rid, "object": obj, "created": created, "model": front.model_name,
                   "choices": [c]}  # fmt: skip
            if req.continuous_usage:  # vLLM's: this choice's usage so far, in every chunk
                n_prompt, n = len(of[i].tokens), len(replies[i].tokens)
                out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n,
                                "total_tokens": n_prompt + n}  # fmt: skip
            return out

        async def events(i: int, reply: Reply):
            """Choice ``i``'s server-sent events, up to its finish_reason."""
            if kind == "chat":
                yield sse(chunk(i, {"role": "assistant", "content": ""}))
            elif req.echo and front.tokenizer is not None:
                yield sse(chunk(i, {"content": self.echoed(of[i])}))
            prompt, offset = list(reply.pending.request.tokens), 0
            async for token, piece, logprob in reply.pieces():
                c = chunk(i, {"content": piece}, token=token)
                if logprob is not None:  # this token's, as the whole answer would give it
                    seq, at = prompt + reply.tokens, len(prompt) + len(reply.tokens) - 1
                    lp = [logprob[0]], [logprob[1]]
                    if kind == "chat":
                        c["choices"][0]["logprobs"] = chat_logprobs(front, seq, at, *lp)
                    else:
                        one = completion_logprobs(front, seq, at, *lp)
                        one["text_offset"] = [offset]
                        offset += len(one["tokens"][0])
                        c["choices"][0]["logprobs"] = one
                yield sse(c)
            o = reply.outcome
            if not reply.stopped and o.finish_reason == "abort":
                yield sse(chunk(i, {}, "abort"))
                return
            if not reply.stopped and o.error is not None:
                yield error_event(f"generation failed: {o.error}")
                return
            rest = reply.rest()
            if rest:  # a partial character, or a possible stop string's start, held back
                yield sse(chunk(i, {"content": rest}))
            yield sse(chunk(i, {}, reply.finish_reason))

        try:
            async for data in merged([events(i, r) for i, r in enumerate(replies)]):
                yield data
            if req.include_usage:
                outcomes = [await r.finished() for r in replies]
                completion = sum(len(r.tokens) for r in replies)
                yield sse({"id": rid, "object": obj, "created": created,
                           "model": front.model_name, "choices": [],
                           "usage": _request_usage(prompts, outcomes, completion)})  # fmt: skip
        except BaseException as e:
            front.cancel_all(pendings)
            if not isinstance(e, Exception):  # cancelled: the client left
                raise
            # formatting this answer failed: this stream ends alone
            yield error_event(f"internal error: {type(e).__name__}: {e}")
        yield sse("[DONE]")

    # -- endpoints --------------------------------------------------------------------------------
    async def completions(self, http: HttpRequest, req: CompletionRequest):
        return await self.serve(http, req, self.prompts(req), "completion")

    async def chat(self, http: HttpRequest, req: ChatRequest):
        return await self.serve(http, req, [Prompt(self.front.chat_tokens(req.messages))], "chat")
