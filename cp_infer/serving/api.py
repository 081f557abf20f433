"""The HTTP front end in the API process: the FastAPI app, its error handling and small endpoints.

The generation endpoints live beside it (:mod:`~cp_infer.serving.openai_api`,
:mod:`~cp_infer.serving.megatron_api`); all of them share one
:class:`~cp_infer.serving.frontend.Frontend`, the bridge to the engine thread. Each takes its
request model (:mod:`cp_infer.serving.protocol`) as its declared body, so ``/openapi.json``
documents every field and its bounds. What can go wrong, and what a client gets:

- a body that is not JSON, not an object, or not of the model: 400 naming the field;
- a request the model cannot take (context, vocabulary, memory): 400 naming the fix;
- the queue full: 503 with Retry-After; the server stopping: 503; while the engine restarts
  after a rank died, requests queue (the queue full: 503 with Retry-After);
- anything else raised while answering one request: a 500 for that request alone, logged with
  its traceback. The engine goes on.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from cp_infer.serving.frontend import BadRequest, Frontend, QueueFull, ShuttingDown
from cp_infer.serving.http_util import error_response
from cp_infer.serving.megatron_api import MegatronServing
from cp_infer.serving.metrics import CONTENT_TYPE
from cp_infer.serving.openai_api import OpenAIServing
from cp_infer.serving.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    MegatronRequest,
    TokenizeRequest,
    first_error,
)

__all__ = ["build_app"]

logger = logging.getLogger(__name__)

#: Seconds a 503 asks a client to wait before retrying (queue full, engine restarting).
RETRY_AFTER_S = 2


def _add_error_handlers(app: FastAPI, front: Frontend) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(http: HttpRequest, e: RequestValidationError):
        front.metrics.reject("bad_request")
        return error_response(http, 400, *first_error(e.errors()))

    @app.exception_handler(BadRequest)
    async def _bad(http: HttpRequest, e: BadRequest):
        front.metrics.reject("bad_request")
        return error_response(http, 400, str(e), e.param)

    @app.exception_handler(QueueFull)
    async def _full(http: HttpRequest, e: QueueFull):
        front.metrics.reject("queue_full")
        response = error_response(http, 503, str(e))
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(ShuttingDown)
    async def _stopping(http: HttpRequest, e: ShuttingDown):
        front.metrics.reject("stopping")
        return error_response(http, 503, f"the server is not taking requests: {e}")

    @app.exception_handler(Exception)
    async def _failed(http: HttpRequest, e: Exception):
        logger.exception("%s %s failed", http.method, http.url.path)
        return error_response(http, 500, f"internal error: {type(e).__name__}: {e}")


def build_app(front: Frontend) -> FastAPI:
    """The FastAPI app of rank 0."""
    app = FastAPI(
        title="cp_infer", description="context-parallel inference server (see docs/serving.md)"
    )
    _add_error_handlers(app, front)
    openai, megatron = OpenAIServing(front), MegatronServing(front)

    @app.get("/health")
    async def health():
        if not front.ready.is_set():  # the ranks are still loading the model
            return JSONResponse({"status": "starting"}, status_code=503)
        if front.down is not None:  # a rank died: the engines restart, requests wait
            body = {"status": "restarting", "reason": front.down, "queued": front.queued,
                    "live": front.live}  # fmt: skip
            return JSONResponse(body, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
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

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: HttpRequest):
        return await openai.completions(http, req)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, http: HttpRequest):
        return await openai.chat(http, req)

    @app.put("/api")
    async def megatron_api(req: MegatronRequest, http: HttpRequest):
        return await megatron.generate(http, req)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        ids = front.encode(req.prompt, "prompt", special=req.add_special_tokens) if (
            req.prompt is not None) else (
            front.chat_tokens(req.messages))  # fmt: skip
        return {"tokens": ids, "count": len(ids), "max_model_len": front.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        bad = [t for t in req.tokens if not 0 <= t < front.vocab_size]
        if bad:
            raise BadRequest(
                f"token ids {bad[:5]} are outside the vocabulary [0, {front.vocab_size})", "tokens"
            )
        if front.tokenizer is None:
            raise BadRequest("this server's checkpoint has no tokenizer", "tokens")
        return {"prompt": front.decode(req.tokens)}

    return app
