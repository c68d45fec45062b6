"""Traces of proxied requests, by the OpenTelemetry GenAI conventions: a server span per
request (`chat llama-8b`), a client span per attempt at a backend (its backend, outcome and why
it was retried) whose `traceparent` the backend gets, and the first token as an event.

The request flow calls `RequestTracer.request_span` once, then `attempt`, `AttemptSpan.end`
and `RequestSpan.finish`. With tracing off there is no tracer (`app[TRACER]` is None) and no
span, so the flow's cost is one `is None` check at each of those places.

Never recorded: prompt or completion text, keys, header values (secrets or not), error
messages; only ids, numbers, kinds and the backend's host and port."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.routing import Hop

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from gateway.middleware import RequestRecord
    from gateway.request_body import RequestBody
    from wire.tracing_sdk import Tracing

# gen_ai.operation.name by API path below /v1; any other path is traced under its family.
OPERATIONS = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
# The request's sampling settings that the conventions name, by body member.
_REQUEST_SETTINGS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
)
FIRST_TOKEN_EVENT = "gen_ai.first_token"


def _wall_clock_offset() -> int:
    """Nanoseconds to add to a monotonic time (in ns) for the epoch time spans carry."""
    return time.time_ns() - time.monotonic_ns()


class RequestTracer:
    """The app's tracer for proxied requests (`app[TRACER]`, None when tracing is off)."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def request_span(
        self, request: web.Request, tail: str, body: RequestBody, record: RequestRecord
    ) -> RequestSpan:
        """The server span of a request routed to a model, started when it arrived."""
        operation = OPERATIONS.get(tail, record.family)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": body.model,
            "http.request.method": request.method,
            "url.path": request.path,
            "gateway.request_id": record.request_id,
        }
        payload = body.payload
        if payload is not None:
            for member, name in _REQUEST_SETTINGS:
                value = payload.get(member)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    attributes[name] = value
        offset = _wall_clock_offset()
        span = self.tracing.server_span(
            f"{operation} {body.model}",
            request.headers,
            offset + int(record.started * 1e9),
            attributes,
        )
        return RequestSpan(self.tracing, span, operation, offset)


class RequestSpan:
    """One request's server span, and the attempts under it."""

    __slots__ = ("_hop", "_offset", "_operation", "_tracing", "span")

    def __init__(self, tracing: Tracing, span: Span, operation: str, offset: int) -> None:
        self._tracing = tracing
        self.span = span
        self._operation = operation
        self._offset = offset
        self._hop: Hop | None = None  # the latest attempt's

    def attempt(self, hop: Hop, number: int) -> AttemptSpan:
        """A client span for one attempt at a backend, from now until its verdict."""
        self._hop = hop
        url = hop.base_url
        span = self._tracing.child_span(
            self.span,
            f"{self._operation} {hop.upstream_model}",
            {
                "gen_ai.operation.name": self._operation,
                "gen_ai.request.model": hop.upstream_model,
                "server.address": url.host or "",
                "server.port": url.port or 0,
                "gateway.backend": hop.backend_label,
                "gateway.attempt": number,
            },
        )
        return AttemptSpan(self._tracing, span)

    def finish(self, record: RequestRecord, status: int) -> None:
        """Ends the span with what the request came to (called once, as it ends)."""
        span = self.span
        attributes: dict[str, Any] = {"http.response.status_code": status}
        hop = self._hop
        if hop is not None:
            url = hop.base_url
            attributes["server.address"] = url.host or ""
            attributes["server.port"] = url.port or 0
            attributes["gen_ai.response.model"] = hop.upstream_model
        if record.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = record.prompt_tokens
        if record.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = record.completion_tokens
        if record.key is not None:
            attributes["gateway.key"] = record.key  # the key's configured name, not the key
        attributes["gateway.attempts"] = record.attempts
        span.set_attributes(attributes)
        if record.first_byte_at is not None and record.streamed:
            span.add_event(
                FIRST_TOKEN_EVENT, timestamp=self._offset + int(record.first_byte_at * 1e9)
            )
        error = record.error or (str(status) if status >= 500 else None)
        if error is not None:
            self._tracing.set_error(span, error)
        span.end()


class AttemptSpan:
    """One attempt's client span."""

    __slots__ = ("_tracing", "span")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """The backend's `traceparent`: this attempt's span, in the client's trace."""
        self._tracing.inject(self.span, headers)

    def end(
        self,
        status: int | None,
        failure: str | None,
        retry_reason: str | None,
        completed: bool,
    ) -> None:
        """The attempt's verdict: answered, retried (and why), failed, or cancelled."""
        span = self.span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if retry_reason is not None:
            outcome = "retried"
            span.set_attribute("gateway.retry_reason", retry_reason)
        elif failure is not None:
            outcome = "failed"
        else:
            outcome = "answered" if completed else "cancelled"
        span.set_attribute("gateway.outcome", outcome)
        if failure is not None:
            self._tracing.set_error(span, failure)
        span.end()
