"""Request id and access log, and bearer-key auth for /v1 routes."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from wire.errors import APIError, Handler
from wire.headers import REQUEST_ID_HEADER, accept_request_id, bearer_token

Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

log = structlog.get_logger("worker.access")


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to every log line of this request and write one access line."""
    request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    request["request_id"] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 499  # stays so if the client goes away before an answer
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        usage = request.get("usage") or {}
        # Prompts and keys are never logged: only sizes and timings.
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: streamed responses get the header too."""
    request_id = request.get("request_id")
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id


def auth_middleware(api_key: str) -> Middleware:
    expected = api_key.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            token = bearer_token(request.headers.get("Authorization")) or ""
            if not hmac.compare_digest(token.encode(), expected):
                return APIError.unauthorized(
                    "Missing or invalid API key: send `Authorization: Bearer <WORKER_API_KEY>`.",
                    code="invalid_api_key",
                ).to_response()
        return await handler(request)

    return auth
