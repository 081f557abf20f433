"""The bridge between the HTTP handlers (the event loop) and the engine, in the API process.

Handlers check a request against the model (:meth:`Frontend.make_request`), queue it
(:meth:`Frontend.submit`) and read its tokens from a :class:`Pending`; the engine, through the
pipe to rank 0 (:class:`~cp_infer.serving.ipc.ApiLink`), takes queued requests
(:meth:`Frontend.next_batch`), hands back each step's tokens (:meth:`Frontend.emit`) and the
outcome when a request ends (:meth:`Frontend.done`). A client
that leaves, or a stop string met, cancels its request (:meth:`Frontend.cancel`); the engine
stops it at its next orders. When the server stops or a rank fails, :meth:`Frontend.abort_all`
ends every live request at once with an outcome that says why, and no new one is taken.
:class:`Reply` turns one request's tokens into text, cut at its stop strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cp_infer.engine.params import SamplingConfig
from cp_infer.engine.request import Outcome, Request, check_pool, check_request
from cp_infer.schema import RequestError
from cp_infer.serving.metrics import ServerMetrics
from cp_infer.serving.text import StopStrings, TextStream

logger = logging.getLogger(__name__)

__all__ = [
    "BadRequest", "Frontend", "Pending", "QueueFull", "Reply", "ShuttingDown", "fresh_seed",
]  # fmt: skip

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
    # (token, logprob) of every token the engine sent, across its restarts
    delivered: list[tuple[int, object]] = field(default_factory=list)
    resumes: int = 0  # engine deaths it was in flight at

    def resumed(self) -> Request:
        """Its request as a restarted engine takes it: the tokens it got so far recomputed."""
        return dataclasses.replace(self.request, generated=tuple(t for t, _ in self.delivered))

    def ended(self, finish_reason: str, error: str | None = None) -> Outcome:
        """Its outcome, ended by the API process itself: the tokens it got so far."""
        return Outcome(tokens=[t for t, _ in self.delivered], finish_reason=finish_reason,
                       prompt_tokens=len(self.request.tokens), error=error)  # fmt: skip

    def finished_early(self) -> Outcome | None:
        """Its outcome, when the tokens it got already end it (the engine died between its last
        token and its end): EOS met, or the budget spent."""
        sampling = self.request.sampling
        last = self.delivered[-1][0] if self.delivered else None
        if last is None or not (last in sampling.eos_ids
                                or len(self.delivered) >= sampling.max_new_tokens):  # fmt: skip
            return None
        o = self.ended("stop" if last in sampling.eos_ids else "length")
        if self.request.logprobs:  # the prompt's log-probabilities went with the engine
            o.finish_reason = "error"
            o.error = ("the engine restarted after this request's last token, and its prompt's "
                       "log-probabilities were lost with it: send it again")  # fmt: skip
        elif self.request.wants_logprobs:
            o.logprobs, o.top_logprobs = _spliced(self.delivered, [], [], self.request)
        return o


def _spliced(delivered, logprobs, tops, request: Request):
    """An outcome's log-probabilities with those of the tokens delivered before a restart in
    front (the restarted engine computed only the tokens after them)."""
    lps = [e[0] for _, e in delivered]
    alts = [e[1] for _, e in delivered] if request.top_logprobs is not None else None
    return lps + list(logprobs or []), None if alts is None else alts + list(tops or [])


class Frontend:
    """What the HTTP handlers and the engine's link share in the API process.

    Args:
        tokenizer: a transformers tokenizer of the checkpoint, or None (token ids only).
        model_name: the name ``/v1/models`` lists.
        vocab_size, max_seq_len: the model's limits, checked before a request is queued.
        max_batch: requests per engine batch.
        max_queue: requests waiting at most; one more gets a 503.
        eos_ids: the checkpoint's end-of-sequence ids.
        pool: the engine's latest :class:`~cp_infer.engine.request.PoolStats` (None until it
            runs): a request that cannot fit the KV pool even alone gets a 400.
        info: labels of ``/metrics``' ``cp_infer_info`` (the layout, say).
        max_resumes: times one request is resumed after the engine died under it; in flight at
            one more death, it fails alone (it may be what kills the engine).
    """

    def __init__(
        self, *, tokenizer, model_name: str, vocab_size: int, max_seq_len: int, max_batch: int,
        max_queue: int, eos_ids: frozenset[int] = frozenset(), pool=None,
        info: dict[str, str] | None = None, max_resumes: int = 2,
    ) -> None:  # fmt: skip
        self.tokenizer, self.model_name = tokenizer, model_name
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.max_batch, self.max_queue, self.eos_ids = max_batch, max_queue, eos_ids
        self.max_resumes = max_resumes
        self.pool = pool or (lambda: None)  # -> PoolStats | None
        self._queue: queue.Queue[Pending] = queue.Queue()
        self._live: dict[int, Pending] = {}
        self._cancelled: set[int] = set()
        self._stopped: set[int] = set()  # cancelled by a stop string: they finished ("stop")
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.stopping = threading.Event()  # set: take no request, the engine loop stops
        self.stop_reason: str | None = None
        self.created = int(time.time())
        # told when a request is queued or cancelled (the engine's link pushes it on)
        self.on_change: Callable[[], None] | None = None
        self.ready = threading.Event()  # the engine runs (set when it first connects)
        self._taken: set[int] = set()  # requests the engine took and has not ended
        self.down: str | None = None  # why the engine is away (restarting), None while it runs
        self.down_since: float | None = None
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
        top_logprobs: int | None = None, budget: str = "max_tokens",
    ) -> Request:  # fmt: skip
        """The engine's request, checked against the model (:func:`check_request`) and the
        memory; ``budget`` is how this API names the token budget."""
        pool = self.pool()
        try:
            check_request(tokens, sampling.max_new_tokens, vocab_size=self.vocab_size,
                          max_seq_len=self.max_seq_len, budget=budget)  # fmt: skip
            if pool is not None and pool.total_blocks:
                check_pool(len(tokens), sampling.max_new_tokens, n_blocks=pool.total_blocks,
                           block_size=pool.block_size, cp=pool.cp, budget=budget)  # fmt: skip
        except RequestError as e:
            raise BadRequest(str(e), e.param) from e
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
            if self.stopping.is_set():
                raise ShuttingDown(self.stop_reason or "the server is stopping")
            if self._queue.qsize() + len(requests) > self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue}); retry later")
            pending = [Pending(r, loop) for r in requests]
            for p in pending:
                self.metrics.submitted(p.request.rid)
                self._live[p.request.rid] = p
                self._queue.put(p)
        self._changed()
        return pending

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def cancel(self, rid: int, *, stopped: bool = False) -> None:
        """Stop ``rid`` at the engine's next orders: its client left, or (``stopped``) its
        text reached a stop string, which finishes it."""
        with self._lock:
            if rid not in self._live:
                return
            self._cancelled.add(rid)
            if stopped:
                self._stopped.add(rid)
        self._changed()

    def cancel_all(self, pendings: list[Pending]) -> None:
        """Cancel every request of ``pendings`` (one client's: it left, or one failed)."""
        for p in pendings:
            self.cancel(p.request.rid)

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
                self._taken.add(p.request.rid)
                if not p.request.generated:
                    self.metrics.scheduled(p.request.rid)
        return [p.request for p in batch if p not in gone]

    def emit(self, events: list[tuple]) -> None:
        """A step's tokens, (rid, token, logprob) each, to their handlers: one wake-up of each
        event loop for all of them."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, token, logprob in events:
            p = self._live.get(rid)
            if p is not None:
                self.metrics.token(rid)
                p.delivered.append((token, logprob))
                event = token if logprob is None else (token, logprob)
                by_loop.setdefault(p.loop, []).append((p.events, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits
                loop.call_soon_threadsafe(_deliver, items)

    def cancelled(self) -> set[int]:
        with self._lock:
            return set(self._cancelled)

    def done(self, batch: list[Request], outcomes: dict[int, Outcome]) -> None:
        for r in batch:
            with self._lock:
                p = self._live.get(r.rid)
                stopped = r.rid in self._stopped
                self._forget(r.rid)
            if p is None:  # aborted already (the server is stopping)
                continue
            o = outcomes[r.rid]
            if r.generated and r.wants_logprobs and not r.logprobs:  # resumed: theirs first
                got = p.delivered[: len(r.generated)]
                o.logprobs, o.top_logprobs = _spliced(got, o.logprobs, o.top_logprobs, r)
            self._deliver_outcome(p, o, stopped)

    def _deliver_outcome(self, p: Pending, o: Outcome, stopped: bool) -> None:
        """``p`` ended (it is forgotten already): its metrics, and its handler gets ``o``."""
        reason = "stop" if stopped and o.error is None else o.finish_reason
        self.metrics.finish(
            p.request.rid, reason, prompt_tokens=o.prompt_tokens, cached_tokens=o.cached_tokens
        )
        with contextlib.suppress(RuntimeError):
            p.loop.call_soon_threadsafe(p.events.put_nowait, o)

    def abort_all(self, reason: str, *, finish_reason: str = "abort") -> int:
        """Stop taking requests and end every live one now with ``finish_reason`` and
        ``reason`` as its error (safe from any thread); returns how many were ended.

        ``"abort"``: the server is stopping (streams end with that finish reason);
        ``"error"``: a rank failed (streams get an error event)."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
            self.stopping.set()
            live = list(self._live.values())
            for p in live:
                self._forget(p.request.rid)
        for p in live:
            self.metrics.finish(p.request.rid, finish_reason)
            outcome = Outcome(finish_reason=finish_reason, error=reason,
                              prompt_tokens=len(p.request.tokens))  # fmt: skip
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits
                p.loop.call_soon_threadsafe(p.events.put_nowait, outcome)
        return len(live)

    def _forget(self, rid: int) -> None:
        self._live.pop(rid, None)
        self._cancelled.discard(rid)
        self._stopped.discard(rid)
        self._taken.discard(rid)

    # -- restarts --------------------------------------------------------------------------------
    def engine_down(self, reason: str, since: float | None = None) -> None:
        """The engine is away (its rank 0 is gone; the keepers restart it): requests keep
        queueing, those it had taken wait to resume, ``/health`` says why."""
        with self._lock:
            if since is not None:  # the keeper's word: a restart (the link's comes first)
                self.metrics.restarts.inc()
            if self.down is None or since is not None:
                self.down, self.down_since = reason, since or time.time()
        logger.warning("%s", reason)

    def engine_up(self) -> int:
        """An engine connected: the requests the last one had taken go first in the queue, as
        their prompts plus the tokens they got (:meth:`Pending.resumed`). Returns how many."""
        ended: list[tuple[Pending, Outcome, bool]] = []
        with self._lock:
            taken = [self._live[rid] for rid in sorted(self._taken) if rid in self._live]
            resumed = []
            for p in taken:
                rid = p.request.rid
                early = p.finished_early()
                p.resumes += 1
                if early is None and p.resumes > self.max_resumes:
                    early = p.ended("error", f"the engine died {p.resumes} times while this "
                                    "request ran (it may be what kills it): not resumed again "
                                    "(serve --max-resumes)")  # fmt: skip
                if rid in self._cancelled or early is not None:
                    stopped = rid in self._stopped
                    if early is None:  # its client left, or a stop string ended it
                        early = p.ended("cancelled")
                    self._forget(rid)
                    ended.append((p, early, stopped))
                    continue
                p.request = p.resumed()
                resumed.append(p)
            self._taken.clear()
            waiting = []
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
            for p in resumed + waiting:  # they were first; they go first
                self._queue.put(p)
            if self.down_since is not None:
                self.metrics.restart_seconds.observe(time.time() - self.down_since)
            self.down = self.down_since = None
        for p, o, stopped in ended:
            logger.info("request %d ended with the engine (%s, %d tokens)", p.request.rid,
                        o.finish_reason, len(o.tokens))  # fmt: skip
            self._deliver_outcome(p, o, stopped)
        self.metrics.engine_started()
        self.metrics.resumed.inc(len(resumed))
        self.ready.set()
        self._changed()
        return len(resumed)

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str, param: str, *, special: bool = True) -> list[int]:
        """``text``'s token ids, with the tokenizer's special tokens (a Llama 3 tokenizer puts
        BOS first) unless ``special`` is False: what ``tokenizer(text)`` gives in transformers,
        vLLM's completions and ``generate``'s text prompts."""
        if self.tokenizer is None:
            raise BadRequest(
                "this server's checkpoint has no tokenizer: send token ids instead of text", param
            )
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=special))
        except Exception as e:  # a text the tokenizer cannot take: the request's fault
            raise BadRequest(f"{param}: the tokenizer cannot encode this text ({e})", param) from e

    def decode(self, tokens: list[int], *, skip_special: bool = False) -> str | None:
        """The text of ``tokens``; ``skip_special``: special tokens (BOS, EOS, a chat model's
        end of turn) give none, as vLLM's ``skip_special_tokens``."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special)

    def context(self, prompt: Sequence[int]) -> list[int]:
        """The prompt's last few tokens, to decode an answer after (whole characters only)."""
        for n in range(min(CONTEXT_TOKENS, len(prompt)), 0, -1):
            text = self.tokenizer.decode(list(prompt[-n:]))
            if not (text.startswith("\ufffd") or text.endswith("\ufffd")):
                return list(prompt[-n:])
        return []

    def continuation(
        self, prompt: Sequence[int], tokens: list[int], *, skip_special: bool = False
    ) -> str | None:
        """The text of ``tokens`` where they follow ``prompt`` (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        head = self.context(prompt)
        text = self.decode(head + tokens, skip_special=skip_special)
        return text[len(self.decode(head, skip_special=skip_special)) :]

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
        try:
            out = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True
            )
        except Exception as e:  # the template refuses these messages (roles out of order, say)
            raise BadRequest(
                f"messages: the chat template cannot take them ({e})", "messages"
            ) from e
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


class Reply:
    """One request's tokens and text as they come, the text cut at its stop strings.

    Args:
        front: the server's frontend (its tokenizer; told when a stop string ends the request).
        pending: the request.
        stops: its stop strings.
        min_tokens: tokens before the stop strings are looked for (vLLM's ``min_tokens``).
        skip_special: special tokens add no text (vLLM's ``skip_special_tokens``).
    """

    def __init__(
        self, front: Frontend, pending: Pending, stops: tuple[str, ...] = (), min_tokens: int = 0,
        *, skip_special: bool = True,
    ) -> None:  # fmt: skip
        self.front, self.pending, self.min_tokens = front, pending, min_tokens
        self.text = None
        if front.tokenizer is not None:
            self.text = TextStream(
                lambda tokens: front.decode(tokens, skip_special=skip_special),
                front.context(pending.request.tokens),
            )
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
                if self.cut is not None and len(self.tokens) >= self.min_tokens:
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


class QueueFull(RuntimeError):
    """The queue is full: retry later (503)."""


class ShuttingDown(RuntimeError):
    """The server is stopping, or a rank failed: no request is taken any more (503)."""


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for events, event in items:
        events.put_nowait(event)


def fresh_seed() -> int:
    """A seed for a request that gave none: fresh randomness, as vLLM and OpenAI draw."""
    return secrets.randbits(63)
