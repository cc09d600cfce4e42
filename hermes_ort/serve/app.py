"""The HTTP routes, on Starlette: OpenAI's /v1/models, /v1/chat/completions, /v1/completions
and /v1/embeddings, plus /health and /metrics. Every error a client can cause is an OpenAI-style
body with its status (api_errors.py); anything else is a 500 whose body names no code."""

from __future__ import annotations

import hmac
import sys
from collections.abc import AsyncIterator

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hermes_ort.core.errors import HermesError, InputError, TokenizerError
from hermes_ort.serve.api_errors import ApiError, bad_request, too_large, unauthorized
from hermes_ort.serve.metrics import CONTENT_TYPE, ServerMetrics
from hermes_ort.serve.openai_bodies import (
    DONE,
    ReplyShape,
    embeddings_body,
    event,
    models_body,
)
from hermes_ort.serve.openai_requests import (
    Limits,
    TextParams,
    chat_request,
    completion_request,
    embedding_request,
    parse_json,
)
from hermes_ort.serve.serve_options import ServeOptions
from hermes_ort.serve.served_model import ServedModel
from hermes_ort.serve.text_stream import TextGeneration

ENDPOINTS = (
    "/health",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/metrics",
)


def make_app(served: ServedModel, options: ServeOptions) -> Starlette:
    limits = Limits(model=served.name, context=served.context or 1)
    metrics = ServerMetrics(served)

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise unauthorized()

    async def read_json(request: Request) -> dict:
        """The body as a JSON object; 413 past the size limit (checked as it arrives)."""
        limit = options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large(limit)
        return parse_json(bytes(body))

    def decoder() -> None:
        if served.scheduler is None:
            raise bad_request(
                f"model '{served.name}' is an encoder: it serves /v1/embeddings only",
                param="model",
                code="unsupported_endpoint",
            )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": served.name})

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse(models_body(served.name, served.created))

    async def chat(request: Request) -> Response:
        authorize(request)
        decoder()
        req = chat_request(await read_json(request), limits)
        ids = served.text.chat_ids(req.messages)
        return await reply(request, ids, req.params, served.text.chat_eos, chat=True)

    async def completions(request: Request) -> Response:
        authorize(request)
        decoder()
        req = completion_request(await read_json(request), limits)
        ids = served.text.completion_ids(req.prompt)
        return await reply(request, ids, req.params, served.text.eos, chat=False)

    async def reply(
        request: Request, ids: list[int], params: TextParams, eos: tuple[int, ...], chat: bool
    ) -> Response:
        """The generation of a checked request's prompt `ids`, answered as chat or text."""
        stops = () if params.ignore_eos else eos
        field = "messages" if chat else "prompt"
        generation = TextGeneration(served.scheduler, served.text, ids, params, stops, field)
        return await respond(request, generation, ReplyShape(served.name, chat=chat), params)

    async def embeddings(request: Request) -> Response:
        authorize(request)
        req = embedding_request(await read_json(request), limits)
        if served.scheduler is not None:
            raise bad_request(
                f"model '{served.name}' is a decoder: /v1/embeddings needs an encoder exported "
                f"for feature-extraction",
                param="model",
                code="unsupported_endpoint",
            )
        texts = list(req.texts)
        vectors = await anyio.to_thread.run_sync(served.model.embed, texts)
        tokens = await anyio.to_thread.run_sync(_token_count, served, texts)
        return JSONResponse(embeddings_body(served.name, vectors, req.encoding_format, tokens))

    async def metrics_route(request: Request) -> Response:
        authorize(request)
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/metrics", metrics_route),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.add_middleware(CountStatus, metrics=metrics)
    return app


async def respond(
    request: Request, generation: TextGeneration, shape: ReplyShape, params: TextParams
) -> Response:
    """The reply whole (its client watched: gone, its generation stops) or as events."""
    generation.start()
    if params.stream:
        events = stream_events(generation, shape, params)
        return StreamingResponse(events, media_type="text/event-stream")
    text = await generation.text_until_done(request.is_disconnected)
    g = generation
    return JSONResponse(shape.whole(text, g.finish_reason, g.prompt_tokens, g.completion_tokens))


async def stream_events(
    generation: TextGeneration, shape: ReplyShape, params: TextParams
) -> AsyncIterator[str]:
    """Server-sent events: the role (chat), each piece, the finish reason, the usage if asked,
    [DONE]. A client that goes away cancels this task, and with it the generation."""
    if shape.chat:
        yield event(shape.chunk("", None, first=True))
    try:
        async for piece in generation.pieces():
            yield event(shape.chunk(piece, None))
    except ApiError as e:  # the status is sent already: the error as the last event
        yield event(e.body())
        return
    yield event(shape.chunk(None, generation.finish_reason))
    if params.include_usage:
        yield event(shape.usage_chunk(generation.prompt_tokens, generation.completion_tokens))
    yield DONE


def _token_count(served: ServedModel, texts: list[str]) -> int:
    return sum(len(served.tokenizer.encode(t)) for t in texts)


def error_response(e: ApiError) -> Response:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def api_error(request: Request, e: Exception) -> Response:
    return error_response(e)


async def http_error(request: Request, e: Exception) -> Response:
    """Starlette's own (no such route, a method it does not take) in OpenAI's shape."""
    message = f"{e.detail}: {request.method} {request.url.path}"
    code = "not_found" if e.status_code == 404 else None
    response = error_response(ApiError(e.status_code, message, code=code))
    response.headers.update(e.headers or {})  # 405's Allow
    return response


async def server_error(request: Request, e: Exception) -> Response:
    """A runtime error a request caused is its 400; anything else a 500 naming no code (the
    server's log has it)."""
    if isinstance(e, (InputError, TokenizerError)):
        return error_response(bad_request(str(e)))
    what = str(e) if isinstance(e, HermesError) else "internal error"
    print(f"hermes-ort serve: {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
    return error_response(ApiError(500, what, type="server_error"))


class CountStatus:
    """Counts each answered request by endpoint and status, for /metrics."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in ENDPOINTS else "other"
                self.metrics.count(path, message["status"])
            await send(message)

        await self.app(scope, receive, counted)
