"""What every endpoint shares: error bodies, server-sent events, and a request that ends when
its client leaves.

OpenAI's endpoints answer an error as ``{"error": {"message", "type", "param", "code"}}``;
Megatron's ``PUT /api`` answers a bare message, as Megatron-LM's server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response

__all__ = [
    "CLIENT_GONE", "error_event", "error_response", "failure_response", "merged", "sse",
    "unless_disconnected",
]  # fmt: skip

#: The status logged for a request whose client left before its answer (nginx's 499).
CLIENT_GONE = 499

_KINDS = {400: "invalid_request_error", 503: "server_busy"}


def error_response(
    http: HttpRequest, status: int, message: str, param: str | None = None
) -> JSONResponse:
    """The error body of the endpoint ``http`` came to."""
    if http.url.path == "/api":
        return JSONResponse(message, status_code=status)
    kind = _KINDS.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def failure_response(http: HttpRequest, outcome) -> JSONResponse:
    """The answer to a request whose engine outcome failed: 503 when the server aborted it
    (it is stopping), else 500 naming the error."""
    if outcome.finish_reason == "abort":
        return error_response(http, 503, f"request aborted: {outcome.error}")
    return error_response(http, 500, f"generation failed: {outcome.error}")


def error_event(message: str) -> bytes:
    """A streamed answer's error, as a server-sent event (OpenAI's error body)."""
    return sse({"error": {"message": message, "type": "server_error", "code": 500}})


def sse(data) -> bytes:
    """One server-sent event (``data`` as JSON, or a string as it is)."""
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


async def merged(streams: list):
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


async def _disconnected(http: HttpRequest) -> None:
    """Returns once the client has closed its connection (the body is read by then: the
    next message the server gets is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(
    http: HttpRequest, work: Callable[[], Awaitable], on_gone: Callable[[], None]
):
    """``await work()``, unless the client leaves first: then the work is cancelled,
    ``on_gone()`` called (cancel the engine's requests) and a 499 returned to nobody.

    A streamed answer needs none of this: Starlette cancels its generator when the client
    leaves. A plain one is computed in full unless someone watches the connection."""
    task = asyncio.ensure_future(work())
    watch = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server cancels the handler (it is stopping)
        task.cancel()
        on_gone()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    on_gone()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=CLIENT_GONE)
