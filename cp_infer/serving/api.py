"""The HTTP front end on rank 0: OpenAI's and Megatron's APIs over one request queue.

Handlers check a request (the typed models of :mod:`cp_infer.serving.protocol`, then tokens
against the vocabulary and the context limit), turn it into engine
:class:`~cp_infer.serving.engine.Request`\\ s and queue them. The engine thread takes up to
``max_batch`` queued requests per batch (:meth:`Frontend.next_batch`) and hands back each token
as it is sampled (with its logprob when asked); handlers stream them as server-sent events or
answer when done (:class:`Reply`: the text, cut at stop strings). ``n`` choices are ``n``
requests. A client that goes away, or a stop string met, cancels its requests; the engine
stops them at its next check. Every request and token is counted for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from cp_infer.engine.sampling import SamplingConfig
from cp_infer.serving.engine import Outcome, Request
from cp_infer.serving.metrics import CONTENT_TYPE, ServerMetrics
from cp_infer.serving.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    MegatronRequest,
    TokenizeRequest,
    first_error,
)
from cp_infer.serving.text import StopStrings, TextStream

__all__ = ["Frontend", "Reply", "build_app"]

logger = logging.getLogger(__name__)

CONTEXT_TOKENS = 4  # prompt tokens an answer's text is decoded after (its leading space)


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Pending:
    """A request waiting for, or getting, its tokens (lives on the event loop's side)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # token ids, then the Outcome


class Frontend:
    """What the HTTP handlers and the engine thread share on rank 0.

    Args:
        tokenizer: a transformers tokenizer of the checkpoint, or None (token ids only).
        model_name: the name ``/v1/models`` lists.
        vocab_size, max_seq_len: the model's limits, checked before a request is queued.
        max_batch: requests per engine batch.
        max_queue: requests waiting at most; one more gets a 503.
        eos_ids: the checkpoint's end-of-sequence ids.
        check_memory: raises ValueError when a request of that many tokens cannot fit a rank.
        info: labels of ``/metrics``' ``cp_infer_info`` (the layout, say).
    """

    def __init__(
        self, *, tokenizer, model_name: str, vocab_size: int, max_seq_len: int, max_batch: int,
        max_queue: int, eos_ids: frozenset[int] = frozenset(), check_memory=None,
        info: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.tokenizer, self.model_name = tokenizer, model_name
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.max_batch, self.max_queue, self.eos_ids = max_batch, max_queue, eos_ids
        self.check_memory = check_memory  # raises ValueError for a context that cannot fit
        self._queue: queue.Queue[Pending] = queue.Queue()
        self._live: dict[int, Pending] = {}
        self._cancelled: set[int] = set()
        self._stopped: set[int] = set()  # cancelled by a stop string: they finished ("stop")
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.stopping = threading.Event()
        self.created = int(time.time())
        self.metrics = ServerMetrics(
            waiting=lambda: self.queued, running=lambda: max(self.live - self.queued, 0),
            info={"model_name": model_name, **(info or {})},
        )  # fmt: skip

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize()

    @property
    def live(self) -> int:
        """Requests queued or running."""
        return len(self._live)

    # -- the handlers' side ----------------------------------------------------------------------
    def make_request(
        self, tokens: list[int], sampling: SamplingConfig, *, logprobs: bool = False,
        top_logprobs: int | None = None,
    ) -> Request:  # fmt: skip
        if not tokens:
            raise BadRequest("the prompt is empty; give at least one token", "prompt")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise BadRequest(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", "prompt"
            )
        total = len(tokens) + sampling.max_new_tokens
        if total > self.max_seq_len:
            raise BadRequest(
                f"the prompt has {len(tokens)} tokens; with {sampling.max_new_tokens} new "
                f"tokens the context ({total}) exceeds the model's {self.max_seq_len}: shorten "
                "the prompt or ask for fewer tokens",
                "max_tokens",
            )
        if self.check_memory is not None:
            try:
                self.check_memory(total)
            except ValueError as e:
                raise BadRequest(str(e), "max_tokens") from e
        return Request(next(self._ids), tuple(tokens), sampling, logprobs, top_logprobs)

    def submit(self, requests: list[Request]) -> list[Pending]:
        loop = asyncio.get_running_loop()
        if len(requests) > self.max_queue:  # would never fit: not a "retry later"
            raise BadRequest(
                f"{len(requests)} sequences in one request exceed the server's queue "
                f"({self.max_queue}, --max-queue): ask for fewer choices or prompts",
                "n",
            )
        with self._lock:
            if self._queue.qsize() + len(requests) > self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue}); retry later")
            pending = [Pending(r, loop) for r in requests]
            for p in pending:
                self.metrics.submitted(p.request.rid)
                self._live[p.request.rid] = p
                self._queue.put(p)
        return pending

    def cancel(self, rid: int, *, stopped: bool = False) -> None:
        """Stop ``rid`` at the engine's next orders: its client left, or (``stopped``) its
        text reached a stop string, which finishes it."""
        with self._lock:
            if rid in self._live:
                self._cancelled.add(rid)
                if stopped:
                    self._stopped.add(rid)

    # -- the engine thread's side ----------------------------------------------------------------
    def next_batch(self, wait_s: float, limit: int | None = None) -> list[Request] | None:
        """Up to ``limit`` (default ``max_batch``) queued requests, waiting up to ``wait_s`` for
        the first ([] if none came; None: stop)."""
        if self.stopping.is_set():
            return None
        self.metrics.maybe_log()
        limit = self.max_batch if limit is None else limit
        batch: list[Pending] = []
        if limit > 0:
            try:
                batch.append(self._queue.get(timeout=wait_s) if wait_s > 0 else
                             self._queue.get_nowait())  # fmt: skip
            except queue.Empty:
                return None if self.stopping.is_set() else []
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        with self._lock:  # requests cancelled while queued never run
            gone = [p for p in batch if p.request.rid in self._cancelled]
            for p in gone:
                self._forget(p.request.rid)
        for p in batch:
            if p in gone:
                self.metrics.finish(p.request.rid, "cancelled")
            else:
                self.metrics.scheduled(p.request.rid)
        return [p.request for p in batch if p not in gone]

    def emit(self, rid: int, token: int, logprob=None) -> None:
        p = self._live.get(rid)
        if p is not None:
            self.metrics.token(rid)
            event = token if logprob is None else (token, logprob)
            p.loop.call_soon_threadsafe(p.events.put_nowait, event)

    def cancelled(self) -> set[int]:
        with self._lock:
            return set(self._cancelled)

    def done(self, batch: list[Request], outcomes: dict[int, Outcome]) -> None:
        for r in batch:
            with self._lock:
                p = self._live.get(r.rid)
                stopped = r.rid in self._stopped
                self._forget(r.rid)
            o = outcomes[r.rid]
            reason = "stop" if stopped and o.error is None else o.finish_reason
            self.metrics.finish(
                r.rid, reason, prompt_tokens=o.prompt_tokens, cached_tokens=o.cached_tokens
            )
            if p is not None:
                p.loop.call_soon_threadsafe(p.events.put_nowait, outcomes[r.rid])

    def _forget(self, rid: int) -> None:
        self._live.pop(rid, None)
        self._cancelled.discard(rid)
        self._stopped.discard(rid)

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str, param: str) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest(
                "this server's checkpoint has no tokenizer: send token ids instead of text", param
            )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, tokens: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(tokens)

    def context(self, prompt: Sequence[int]) -> list[int]:
        """The prompt's last few tokens, to decode an answer after (whole characters only)."""
        for n in range(min(CONTEXT_TOKENS, len(prompt)), 0, -1):
            text = self.tokenizer.decode(list(prompt[-n:]))
            if not (text.startswith("\ufffd") or text.endswith("\ufffd")):
                return list(prompt[-n:])
        return []

    def continuation(self, prompt: Sequence[int], tokens: list[int]) -> str | None:
        """The text of ``tokens`` where they follow ``prompt`` (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        head = self.context(prompt)
        return self.tokenizer.decode(head + tokens)[len(self.tokenizer.decode(head)) :]

    def token_texts(self, seq: Sequence[int], i: int, tokens: Sequence[int]) -> list[str]:
        """The text each of ``tokens`` would add at position ``i`` of ``seq`` (after
        ``seq[:i]``), as logprobs name them (``token_id:N`` without a tokenizer)."""
        if self.tokenizer is None:
            return [f"token_id:{t}" for t in tokens]
        head = list(seq[max(i - CONTEXT_TOKENS, 0) : i])
        n = len(self.tokenizer.decode(head))  # once for all the candidates
        return [self.tokenizer.decode([*head, t])[n:] for t in tokens]

    def chat_tokens(self, messages) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest(
                "this server's checkpoint has no tokenizer with a chat template: use "
                "/v1/completions",
                "messages",
            )
        out = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True
        )
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


class Reply:
    """One request's tokens and text as they come, the text cut at its stop strings.

    Args:
        front: the server's frontend (its tokenizer; told when a stop string ends the request).
        pending: the request.
        stops: its stop strings.
    """

    def __init__(self, front: Frontend, pending: Pending, stops: tuple[str, ...] = ()) -> None:
        self.front, self.pending = front, pending
        self.text = None
        if front.tokenizer is not None:
            self.text = TextStream(front.decode, front.context(pending.request.tokens))
        self.cut = StopStrings(stops) if stops else None
        self.tokens: list[int] = []
        self.outcome: Outcome | None = None
        self.stopped = False

    async def pieces(self):
        """(token, text, logprob) for each token until the request ends or its text meets a
        stop string (which cancels the rest: the engine stops it at its next orders). logprob
        is (its log-probability, [(id, logprob)] of the most likely) when the request asked."""
        rid = self.pending.request.rid
        try:
            while True:
                ev = await self.pending.events.get()
                if isinstance(ev, Outcome):
                    self.outcome = ev
                    return
                token, logprob = (ev, None) if isinstance(ev, int) else ev
                self.tokens.append(token)
                piece = self.text.push(token) if self.text is not None else ""
                if self.cut is not None:
                    piece = self.cut.push(piece)
                    self.stopped = self.cut.stopped
                yield token, piece, logprob
                if self.stopped:
                    self.front.cancel(rid, stopped=True)
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.front.cancel(rid)
            raise

    def rest(self) -> str:
        """The text the last tokens held back (a partial character, a stop string's start)."""
        if self.stopped or self.text is None:
            return ""
        piece = self.text.flush()
        if self.cut is None:
            return piece
        piece = self.cut.push(piece)
        self.stopped = self.cut.stopped
        return piece + self.cut.flush()

    async def finished(self) -> Outcome:
        """The engine's outcome (after a stop string: of the cancelled rest, for its usage)."""
        while self.outcome is None:
            ev = await self.pending.events.get()
            if isinstance(ev, Outcome):
                self.outcome = ev
        return self.outcome

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped else self.outcome.finish_reason

    def usage(self) -> dict:
        return _usage(self.outcome, completion_tokens=len(self.tokens))


class QueueFull(RuntimeError):
    pass


def _openai_error(status: int, message: str, param: str | None = None, kind=None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status == 400 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _usage(o: Outcome, completion_tokens: int | None = None) -> dict:
    n = len(o.tokens) if completion_tokens is None else completion_tokens
    return {
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": o.prompt_tokens + n,
        "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
    }


def _completion_logprobs(
    front: Frontend, seq: list[int], first: int, logprobs: list[float], tops
) -> dict:
    """OpenAI's completions ``logprobs`` of ``seq[first:]`` (the answer, or with ``echo`` the
    prompt too, whose first token has no log-probability): each token's text, log-probability,
    most likely alternatives (the chosen one among them) and offset in the text."""
    texts = front.token_texts(seq, 0, seq[:1]) if first == 0 else []
    lps: list[float | None] = [None] * (first == 0) + list(logprobs)
    top: list[dict | None] = [None] * (first == 0)
    for i, lp, alts in zip(range(max(first, 1), len(seq)), logprobs, tops, strict=True):
        chosen, *names = front.token_texts(seq, i, [seq[i], *(t for t, _ in alts)])
        texts.append(chosen)
        alternatives = dict(zip(names, (v for _, v in alts), strict=True))
        alternatives.setdefault(chosen, lp)
        top.append(alternatives)
    offsets = list(itertools.accumulate((len(x) for x in texts[:-1]), initial=0))
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(front: Frontend, seq: list[int], first: int, logprobs: list[float], tops):
    """OpenAI's chat ``logprobs`` of the answer ``seq[first:]``: per token, its text, bytes,
    log-probability and its ``top_logprobs`` most likely alternatives."""

    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

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


async def _merged(streams: list):
    """The items of several async generators as they come (one: just its own)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(gen):
        try:
            async for item in gen:
                await queue.put(item)
        finally:
            await queue.put(end)

    tasks = [asyncio.create_task(pump(g)) for g in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is end:
                left -= 1
            else:
                yield item
        for t in tasks:
            t.result()  # a stream that failed fails the whole
    finally:
        for t in tasks:
            t.cancel()


def _sse(data) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


def build_app(front: Frontend) -> FastAPI:
    """The FastAPI app of rank 0."""
    app = FastAPI(title="cp_infer", description="context-parallel inference server")

    async def parse(http: HttpRequest, model):
        try:
            body = await http.body()
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise BadRequest(*first_error(e)) from e

    def sampling(req, max_new: int, seed: int) -> SamplingConfig:
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
        return SamplingConfig(
            max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
            seed=seed, eos_id=tuple(sorted(front.eos_ids | set(extra))) or None,
        )  # fmt: skip

    async def finish(pending: Pending) -> tuple[list[int], Outcome]:
        tokens = []
        try:
            while True:
                ev = await pending.events.get()
                if isinstance(ev, Outcome):
                    return tokens, ev
                tokens.append(ev)  # Megatron's requests ask no alternatives: ids only
        except asyncio.CancelledError:
            front.cancel(pending.request.rid)
            raise

    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        front.metrics.reject("bad_request")
        return _openai_error(400, str(e), e.param)

    @app.exception_handler(QueueFull)
    async def _full(_, e: QueueFull):
        front.metrics.reject("queue_full")
        return _openai_error(503, str(e), kind="server_busy")

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": front.queued, "live": front.live}

    @app.get("/metrics")
    async def metrics():
        return Response(front.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": front.model_name, "object": "model", "created": front.created,
                 "owned_by": "cp_infer"}
            ],
        }  # fmt: skip

    async def run_openai(http, req, tokens, kind: str):
        k = _alternatives(req)
        requests = [
            front.make_request(
                tokens, sampling(req, req_budget(req), seed=req.seed + i),
                logprobs=req.echo and k is not None, top_logprobs=k,
            )
            for i in range(req.n)  # n choices: n requests, each with its own seed
        ]  # fmt: skip
        pendings = front.submit(requests)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if req.stream:
            return StreamingResponse(
                stream(pendings, rid, obj + (".chunk" if kind == "chat" else ""), kind, req),
                media_type="text/event-stream",
            )

        async def choice(i: int, pending: Pending) -> tuple[dict | None, Outcome, int]:
            reply = Reply(front, pending, req.stops)
            pieces = [piece async for _, piece, _ in reply.pieces()]
            o = await reply.finished()
            if o.error is not None and not reply.stopped:
                return None, o, 0
            scoring = kind == "completion" and req.max_tokens == 0  # 1 token ran, dropped
            answer = [] if scoring else reply.tokens
            if req.stops and answer == reply.tokens:
                text = "".join(pieces) + reply.rest()
            else:  # the whole answer decoded at once (no piecewise approximation)
                text = front.continuation(tokens, answer)
            logprobs = None
            if k is not None:  # the prompt's (echo), then those of the tokens kept
                n = (len(tokens) - 1) * req.echo + len(answer)
                first = 0 if req.echo else len(tokens)
                shown = (front, tokens + answer, first, o.logprobs[:n], o.top_logprobs[:n])
                logprobs = (_chat_logprobs(*shown) if kind == "chat" else
                            _completion_logprobs(*shown))  # fmt: skip
            if req.echo and text is not None:
                text = echoed(req) + text
            c = {"index": i, "logprobs": logprobs, "finish_reason": reply.finish_reason,
                 "token_ids": answer}  # fmt: skip
            if kind == "chat":
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            return c, o, len(answer)

        results = await asyncio.gather(*(choice(i, p) for i, p in enumerate(pendings)))
        failed = next((o.error for c, o, _ in results if c is None), None)
        if failed is not None:
            return _openai_error(500, f"generation failed: {failed}")
        usage = _usage(results[0][1], completion_tokens=sum(n for _, _, n in results))
        return {"id": rid, "object": obj, "created": int(time.time()), "model": front.model_name,
                "choices": [c for c, _, _ in results], "usage": usage}  # fmt: skip

    def echoed(req) -> str:
        """The prompt as ``echo`` returns it: as sent, or its ids decoded."""
        return req.prompt if isinstance(req.prompt, str) else front.decode(req.prompt)

    def req_budget(req) -> int:
        return req.budget if isinstance(req, ChatRequest) else max(req.max_tokens, 1)

    async def stream(pendings: list[Pending], rid: str, obj: str, kind: str, req):
        created = int(time.time())
        replies = [Reply(front, p, req.stops) for p in pendings]

        def chunk(i, delta, finish=None, token=None):
            c = {"index": i, "finish_reason": finish}
            if kind == "chat":
                c["delta"] = delta
            else:
                c.update(text=delta.get("content", ""), logprobs=None)
            if token is not None:  # an extension: the id, for clients without the tokenizer
                c["token_ids"] = [token]
            return {"id": rid, "object": obj, "created": created, "model": front.model_name,
                    "choices": [c]}  # fmt: skip

        async def events(i: int, reply: Reply):
            """Choice ``i``'s server-sent events, up to its finish_reason."""
            if kind == "chat":
                yield _sse(chunk(i, {"role": "assistant", "content": ""}))
            elif req.echo and front.tokenizer is not None:
                yield _sse(chunk(i, {"content": echoed(req)}))
            prompt, offset = list(reply.pending.request.tokens), 0
            async for token, piece, logprob in reply.pieces():
                c = chunk(i, {"content": piece}, token=token)
                if logprob is not None:  # this token's, as the whole answer would give it
                    seq, at = prompt + reply.tokens, len(prompt) + len(reply.tokens) - 1
                    lp = [logprob[0]], [logprob[1]]
                    if kind == "chat":
                        c["choices"][0]["logprobs"] = _chat_logprobs(front, seq, at, *lp)
                    else:
                        one = _completion_logprobs(front, seq, at, *lp)
                        one["text_offset"] = [offset]
                        offset += len(one["tokens"][0])
                        c["choices"][0]["logprobs"] = one
                yield _sse(c)
            if not reply.stopped and reply.outcome.error is not None:
                yield _sse({"error": {"message": f"generation failed: {reply.outcome.error}",
                                      "type": "server_error"}})  # fmt: skip
                return
            rest = reply.rest()
            if rest:  # a partial character, or a possible stop string's start, held back
                yield _sse(chunk(i, {"content": rest}))
            yield _sse(chunk(i, {}, reply.finish_reason))

        try:
            async for data in _merged([events(i, r) for i, r in enumerate(replies)]):
                yield data
            if req.stream_options is not None and req.stream_options.include_usage:
                outcomes = [await r.finished() for r in replies]
                usage = _usage(outcomes[0], completion_tokens=sum(len(r.tokens) for r in replies))
                yield _sse({"id": rid, "object": obj, "created": created,
                            "model": front.model_name, "choices": [], "usage": usage})  # fmt: skip
            yield _sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            for p in pendings:
                front.cancel(p.request.rid)
            raise

    @app.post("/tokenize")
    async def tokenize(http: HttpRequest):
        req = await parse(http, TokenizeRequest)
        ids = front.encode(req.prompt, "prompt") if req.prompt is not None else (
            front.chat_tokens(req.messages))  # fmt: skip
        return {"tokens": ids, "count": len(ids), "max_model_len": front.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest):
        req = await parse(http, DetokenizeRequest)
        bad = [t for t in req.tokens if not 0 <= t < front.vocab_size]
        if bad:
            raise BadRequest(
                f"token ids {bad[:5]} are outside the vocabulary [0, {front.vocab_size})", "tokens"
            )
        if front.tokenizer is None:
            raise BadRequest("this server's checkpoint has no tokenizer", "tokens")
        return {"prompt": front.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        req = await parse(http, CompletionRequest)
        tokens = req.prompt if isinstance(req.prompt, list) else front.encode(req.prompt, "prompt")
        return await run_openai(http, req, tokens, "completion")

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        req = await parse(http, ChatRequest)
        return await run_openai(http, req, front.chat_tokens(req.messages), "chat")

    @app.put("/api")
    async def megatron(http: HttpRequest):
        # Megatron's server answers errors with a bare message and status 400
        try:
            req = await parse(http, MegatronRequest)
            bos = getattr(front.tokenizer, "bos_token_id", None) if front.tokenizer else None
            if req.add_BOS and bos is None:
                raise BadRequest("add_BOS: this checkpoint's tokenizer has no BOS token")
            eos = {req.stop_token} if req.stop_token is not None else set(front.eos_ids)
            cfg = SamplingConfig(  # 0 tokens (scoring): run 1 and drop it
                max_new_tokens=max(req.tokens_to_generate, 1), temperature=req.temperature,
                top_k=req.top_k, top_p=req.top_p if req.top_p > 0 else 1.0,
                seed=max(req.random_seed, 0), eos_id=tuple(eos) or None,
            )  # fmt: skip
            prompts = [([bos] if req.add_BOS else []) + front.encode(p, "prompts")
                       for p in req.prompts]  # fmt: skip
            requests = [front.make_request(t, cfg, logprobs=req.logprobs) for t in prompts]
            pending = front.submit(requests)
        except BadRequest as e:
            front.metrics.reject("bad_request")
            return JSONResponse(str(e), status_code=400)
        except QueueFull as e:
            front.metrics.reject("queue_full")
            return JSONResponse(str(e), status_code=503)
        results = [await finish(p) for p in pending]
        if any(o.error is not None for _, o in results):
            err = next(o.error for _, o in results if o.error is not None)
            return JSONResponse(f"generation failed: {err}", status_code=500)
        keep = req.tokens_to_generate
        full = [
            list(r.tokens) + o.tokens[:keep] for r, (_, o) in zip(requests, results, strict=True)
        ]
        logprobs = None
        if req.logprobs:  # of every token after the first, prompt and generation
            logprobs = [o.logprobs[: len(t) - 1] for (_, o), t in zip(results, full, strict=True)]
        return {
            "text": [front.decode(t) for t in full],
            "segments": [[front.decode([x]) for x in t] for t in full],
            "logprobs": logprobs,
            "tokens": full,
        }

    return app
