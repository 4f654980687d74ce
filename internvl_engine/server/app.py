"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

A request is parsed and validated (work limits included: body size and read time, JSON depth, images,
characters, stop strings), its images resolved and the request prepared in the engine's bounded
preprocessing pool, and queued by the engine before any byte of the answer is sent, so every bad input gets
its 4xx status and no input can stall the engine loop or the streams. Streams are
Server-Sent Events ending with `data: [DONE]`. A client that disconnects, streaming or not, aborts its
request, which frees its KV blocks at the next engine step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_llm import AsyncLLM
from ..engine.detokenizer import StreamText
from .errors import APIError, engine_error, error_body, limit_error
from .media import MediaPolicy, resolve_messages
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (ChatRequest, CompletionRequest, RequestLimits, chunk, completion, completion_id,
                       parse_chat_request, parse_completion_request, text_chunk, text_completion, usage)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ServerConfig:
    served_model_names: tuple[str, ...]
    api_key: str | None = None
    max_request_bytes: int = 64 << 20  # a JSON body (base64 images included)
    body_timeout_s: float = 60.0  # to receive the whole body, from the first byte after the head
    max_json_depth: int = 32  # nesting of the JSON body (a chat request needs 6)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    # None: the defaults, with the engine's vocabulary and tile limit
    limits: RequestLimits | None = None


class _Gate:
    """ASGI middleware: the API key on /v1/ routes, and a count of responses by route and status."""

    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started = []

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":  # counted before the client can see the response
                started.append(message["status"])
                self.metrics.http_responses.labels(route=route, status_code=str(message["status"])).inc()
            await send(message)

        try:
            if self.expected is not None and scope["path"].startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    message = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
                    await JSONResponse(error_body(401, message, code="invalid_api_key"), status_code=401)(
                        scope, receive, counting_send)
                    return
            await self.app(scope, receive, counting_send)
        finally:
            if not started:  # the application failed before answering
                self.metrics.http_responses.labels(route=route, status_code="500").inc()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes. An oversized body is still drained (up to 4x the limit) so the
    client, which is usually still sending, reads the 413 instead of a reset connection."""
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() and len(length) < 20 else None
    too_large = declared is not None and declared > limit
    parts, size = [], 0
    if not (too_large and declared > 4 * limit):
        async for part in request.stream():
            size += len(part)
            too_large = too_large or size > limit
            if size > 4 * limit:
                break
            if not too_large:
                parts.append(part)
    if too_large:
        raise limit_error(f"the request body is {declared or f'over {limit}'} bytes, over the limit of {limit}",
                          "max_request_bytes", code="request_too_large")
    return b"".join(parts)


def json_too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests dicts and lists deeper than `limit` (iterative: any depth is safe to check)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


async def _read_json(request: Request, config: ServerConfig) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise APIError(415, f"the request body must be JSON (Content-Type: application/json), got {kind[:80]!r}",
                       code="unsupported_media_type")
    try:
        body = await asyncio.wait_for(_read_body(request, config.max_request_bytes), config.body_timeout_s)
    except asyncio.TimeoutError:
        raise limit_error(f"the request body was not received within {config.body_timeout_s:g} s", "body_timeout_s",
                          status=408) from None
    try:
        value = json.loads(body)
    except RecursionError:
        value = None
        too_deep = True
    except ValueError as err:  # JSONDecodeError, bad UTF-8, an integer over Python's 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {str(err)[:200]}", code="invalid_json") from None
    else:
        too_deep = json_too_deep(value, config.max_json_depth)
    if too_deep:
        raise limit_error(f"the JSON body nests deeper than {config.max_json_depth} levels", "max_json_depth",
                          status=400)
    return value


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def build_app(engine: AsyncLLM, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="internvl-engine", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine, config.served_model_names[0])
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(_Gate, api_key=config.api_key, metrics=metrics)
    limits = config.limits or RequestLimits(engine.llm.model.config.llm.vocab_size,
                                            max_tiles=engine.llm.config.max_tiles_per_image)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        if err.limit is not None:
            metrics.refusals.labels(limit=err.limit).inc()
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "unfinished_requests": engine.num_unfinished})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "internvl-engine",
                "max_model_len": engine.llm.scheduler.config.max_model_len,
                "weight_dtype": engine.llm.model.weight_dtype}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(name) for name in config.served_model_names]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id not in config.served_model_names:
            raise APIError(404, f"model {model_id[:100]!r} is not served here; available: "
                           f"{', '.join(config.served_model_names)}", param="model", code="model_not_found")
        return JSONResponse(model_card(model_id))

    async def _admit(inputs: dict, params: Any, request_id: str, resolve: Any = None, param: str = "messages") -> None:
        """Prepare and queue one request; its errors become their HTTP errors (and count as rejected)."""
        try:
            await engine.add_request(inputs, params, request_id, resolve=resolve)
        except APIError:
            metrics.requests.labels(status="rejected").inc()
            raise
        except (ValueError, TypeError, RuntimeError, OSError) as err:
            metrics.requests.labels(status="rejected").inc()
            raise engine_error(err, param) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = parse_chat_request(await _read_json(request, config), config.served_model_names, limits)
        inputs: dict[str, Any] = {"messages": chat.messages}
        if chat.max_tiles is not None:
            inputs["max_tiles"] = chat.max_tiles
        request_id = completion_id()
        # image URLs are fetched and decoded in the engine's preprocessing pool, under its time limit
        await _admit(inputs, chat.params, request_id, resolve=lambda given: {
            **given, "messages": resolve_messages(given["messages"], config.media)})
        if chat.stream:
            return StreamingResponse(_stream(request_id, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(engine.abort, request_id))
        outputs = await _finals_or_disconnect(request, [request_id])
        if outputs is None:
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        return JSONResponse(completion(request_id, chat.model, outputs[0]))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_completion_request(await _read_json(request, config), config.served_model_names, limits)
        response_id = completion_id("cmpl")
        ids = [f"{response_id}-{index}" for index in range(len(body.prompts))]
        admitted = await asyncio.gather(*(_admit(inputs, body.params, request_id, param="prompt")
                                          for inputs, request_id in zip(body.prompts, ids)), return_exceptions=True)
        failed = [result for result in admitted if isinstance(result, BaseException)]
        if failed:  # one bad prompt refuses the request: the others stop
            for request_id, result in zip(ids, admitted):
                if not isinstance(result, BaseException):
                    engine.abort(request_id)
            raise failed[0]
        if body.stream:
            return StreamingResponse(_text_stream(response_id, ids, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(_abort_all, ids))
        outputs = await _finals_or_disconnect(request, ids)
        if outputs is None:
            return Response(status_code=499)
        return JSONResponse(text_completion(response_id, body.model, outputs))

    def _abort_all(request_ids: list[str]) -> None:
        for request_id in request_ids:
            engine.abort(request_id)

    async def _finals_or_disconnect(request: Request, request_ids: list[str]) -> list | None:
        """The final outputs (None if the client left first: every request is aborted); a failed generation
        raises its 500."""
        async def final(request_id: str):
            last = None
            async for last in engine.stream(request_id):
                pass
            return last

        answer = asyncio.ensure_future(asyncio.gather(*(final(request_id) for request_id in request_ids)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()  # each stream aborts its request
        if not answer.done() or answer.cancelled():
            metrics.requests.labels(status="abort").inc()
            return None
        outputs = answer.result()
        for output in outputs:
            metrics.observe(output)
        error = next((output for output in outputs if output.finish_reason == "error"), None)
        if error is not None:
            raise APIError(500, f"generation failed: {error.error}", code="generation_failed")
        return outputs

    async def _stream(request_id: str, chat: ChatRequest) -> AsyncIterator[str]:
        created, text, finished = int(time.time()), StreamText(chat.params.stop), False
        try:
            yield _event(chunk(request_id, chat.model, created, {"role": "assistant", "content": ""}))
            async for output in engine.stream(request_id):
                finished = output.finished
                if output.finished and output.finish_reason in ("error", "abort"):
                    metrics.observe(output)
                    message = f"generation failed: {output.error}" if output.error else "the request was aborted"
                    yield _event(error_body(500, message, code="generation_failed"))
                    break
                delta = text.delta(output.text, output.finished)
                if delta:
                    yield _event(chunk(request_id, chat.model, created, {"content": delta}))
                if output.finished:
                    metrics.observe(output)
                    yield _event(chunk(request_id, chat.model, created, {}, output.finish_reason))
                    if chat.include_usage:
                        yield _event(chunk(request_id, chat.model, created, None, usage_=usage(output)))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                metrics.requests.labels(status="abort").inc()

    async def _text_stream(response_id: str, request_ids: list[str], body: CompletionRequest) -> AsyncIterator[str]:
        """Every prompt's chunks as they come (each names its choice index), then the usage, then [DONE]."""
        created, events = int(time.time()), asyncio.Queue()
        texts = [StreamText(body.params.stop) for _ in request_ids]

        async def pump(index: int, request_id: str) -> None:
            try:
                async for output in engine.stream(request_id):
                    await events.put((index, output))
            finally:
                await events.put((index, None))

        pumps = [asyncio.ensure_future(pump(index, request_id)) for index, request_id in enumerate(request_ids)]
        finals, open_streams = {}, len(request_ids)
        try:
            while open_streams:
                index, output = await events.get()
                if output is None:
                    open_streams -= 1
                    continue
                if output.finished and output.finish_reason in ("error", "abort"):
                    metrics.observe(output)
                    message = f"generation failed: {output.error}" if output.error else "the request was aborted"
                    yield _event(error_body(500, message, code="generation_failed"))
                    return
                delta = texts[index].delta(output.text, output.finished)
                if output.finished:
                    metrics.observe(output)
                    finals[index] = output
                    yield _event(text_chunk(response_id, body.model, created, index, delta, output.finish_reason))
                elif delta:
                    yield _event(text_chunk(response_id, body.model, created, index, delta))
            if body.include_usage:
                yield _event(text_chunk(response_id, body.model, created, None,
                                        usage_=usage(*(finals[index] for index in sorted(finals)))))
            yield "data: [DONE]\n\n"
        finally:
            for task in pumps:
                task.cancel()
            if len(finals) < len(request_ids):
                metrics.requests.labels(status="abort").inc()

    return app
