"""Traces of the worker's model requests, by the OpenTelemetry GenAI conventions: a server
span per request (`chat demo`) continuing the caller's `traceparent` (the gateway's attempt),
with the request's settings, usage, finish reasons and the first token as an event.

Only installed when tracing is on (an OTLP endpoint is set), so it costs nothing otherwise.
Handlers leave what the span needs on the request: the parsed body (PARSED), `usage`,
FINISH_REASONS and FIRST_TOKEN_NS. Never recorded: prompts, completions, keys, headers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from wire.errors import Handler

if TYPE_CHECKING:
    from wire.tracing_sdk import Tracing

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}
# What handlers put on the request for the span (plain keys: set on every request).
PARSED = "parsed_request"
FINISH_REASONS = "finish_reasons"
FIRST_TOKEN_NS = "first_token_ns"
FIRST_TOKEN_EVENT = "gen_ai.first_token"
CLIENT_CLOSED = 499

Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def tracing_middleware(tracing: Tracing) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        operation = OPERATIONS.get(request.path)
        if operation is None:
            return await handler(request)
        span = tracing.server_span(
            operation,
            request.headers,
            time.time_ns(),
            {"gen_ai.operation.name": operation, "http.request.method": request.method},
        )
        status = CLIENT_CLOSED
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            tracing.set_error(span, "client_disconnected")
            raise
        finally:
            _finish(tracing, span, operation, request, status)

    return middleware


def _finish(tracing: Tracing, span: Any, operation: str, request: web.Request, status: int) -> None:
    attributes: dict[str, Any] = {"http.response.status_code": status}
    parsed = request.get(PARSED)
    if parsed is not None:
        span.update_name(f"{operation} {parsed.model}")
        attributes["gen_ai.request.model"] = parsed.model
        attributes["gen_ai.response.model"] = parsed.model
        max_tokens = getattr(parsed, "requested_max_tokens", None)
        for name, value in (
            ("gen_ai.request.max_tokens", max_tokens),
            ("gen_ai.request.temperature", getattr(parsed, "temperature", None)),
            ("gen_ai.request.top_p", getattr(parsed, "top_p", None)),
        ):
            if value is not None:
                attributes[name] = value
    usage = request.get("usage")
    if usage:
        attributes["gen_ai.usage.input_tokens"] = usage["prompt_tokens"]
        if "completion_tokens" in usage:
            attributes["gen_ai.usage.output_tokens"] = usage["completion_tokens"]
    reasons = request.get(FINISH_REASONS)
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = [r or "cancelled" for r in reasons]
    span.set_attributes(attributes)
    first = request.get(FIRST_TOKEN_NS)
    if first is not None:
        span.add_event(FIRST_TOKEN_EVENT, timestamp=first)
    if status >= 500:
        tracing.set_error(span, str(status))
    span.end()
