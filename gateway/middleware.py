"""The gateway's one middleware: per-request record, request ids, CORS, the error envelope,
and the access line + metrics written when a request ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway.cors import add_cors_headers, allowed_origin, preflight
from gateway.logs import fast_json_handler
from gateway.metrics import Metrics
from gateway.usagelog import UsageLog
from wire.errors import Handler, error_response_for
from wire.headers import REQUEST_ID_HEADER, accept_request_id

if TYPE_CHECKING:
    from gateway.tracing import RequestSpan

# Status for a client that went away before the response ended (nginx's convention).
CLIENT_CLOSED = 499

access_log = structlog.get_logger("gateway.access")
# The stdlib logger under it: its level decides whether the line is written at all.
_ACCESS_LOGGER = logging.getLogger("gateway.access")
_merge_context = structlog.contextvars.merge_contextvars


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    # The endpoint family (`chat.completions`, `models`, `health`): the metrics' `route` label.
    family: str = "other"
    started: float = field(default_factory=time.monotonic)
    model: str | None = None  # as the client sent it (logged)
    route_id: str | None = None  # the configured id it matched (`ollama/*`): the metric label
    backend: str | None = None
    upstream_model: str | None = None
    upstream_status: int | None = None
    first_byte_at: float | None = None
    streamed: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    key: str | None = None  # the client key's name
    limit_headers: dict[str, str] = field(default_factory=dict)
    meters: Meters | None = None  # the app's metric children, for code below the middleware
    attempts: int = 0
    # Every backend failure this request saw, retried or not (metrics count each).
    failures: list[str] = field(default_factory=list)
    cors_origin: str | None = None  # Access-Control-Allow-Origin for the response, if any
    span: RequestSpan | None = None  # its trace, when tracing is on and a model was routed
    # Stream resume: each seam (the backend that died, completion tokens before it), and
    # each decision taken (outcome, reason) for gateway_stream_resumes_total.
    seams: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[tuple[str, str]] = field(default_factory=list)
    # Cache-aware routes: why the backend was chosen (session, prefix, balance, cold) and
    # how much of the request its cache was thought to hold.
    routing: str | None = None
    matched_tokens: int = 0

    def fail(self, kind: str) -> None:
        """The backend failed after its response started: the request ends in this error."""
        self.error = kind
        self.failures.append(kind)


_RECORD = web.RequestKey("record", RequestRecord)


def record_of(request: web.Request) -> RequestRecord:
    return request[_RECORD]


def _request_id(request: web.Request) -> str:
    return accept_request_id(request.headers.get(REQUEST_ID_HEADER))


class Meters:
    """The app's metric children, each looked up once per label values: `labels()` costs more
    than the `inc()` or `observe()` that follows it. A child is made only where `labels()` would
    have been called, so /metrics lists the same series. Label values are bounded (configured
    ids, routes, statuses, key names), and so is this cache. Only the children's public API is
    used, so it works the same with values kept in multiprocess files."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, name: str, *labels: str) -> Any:
        key = (name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = getattr(self.metrics, name).labels(*labels)
        return child

    def in_flight(self, model: str) -> Any:
        return self._child("in_flight", model)

    def finish(self, record: RequestRecord, status: int, duration: float) -> float | None:
        """Count a finished request; returns its time to first byte."""
        child = self._child
        model = self.metrics.model_label(record.route_id or record.model)
        code = str(status)
        child("requests", model, record.family, code).inc()
        child("duration", model, record.family).observe(duration)
        ttft = None
        if record.first_byte_at is not None:
            ttft = record.first_byte_at - record.started
            if record.streamed:
                child("ttft", model).observe(ttft)
        for kind in record.failures:
            child("upstream_errors", model, kind).inc()
        for outcome, reason in record.resumes:
            child("stream_resumes", model, outcome, reason).inc()
        if record.routing is not None:
            child("routing_decisions", model, record.routing).inc()
            child("routing_matched", model).observe(record.matched_tokens)
        self._count_tokens(record, model, code)
        return ttft

    def _count_tokens(self, record: RequestRecord, model: str, code: str) -> None:
        """Tokens by model, and requests and tokens by client key."""
        child = self._child
        prompt, completion = record.prompt_tokens, record.completion_tokens
        if prompt is not None:
            child("tokens", model, "prompt").inc(prompt)
        if completion is not None:
            child("tokens", model, "completion").inc(completion)
        key = record.key
        if key is not None:
            child("key_requests", key, model, code).inc()
            if prompt:
                child("key_tokens", key, model, "prompt").inc(prompt)
            if completion:
                child("key_tokens", key, model, "completion").inc(completion)


def access_middleware(
    metrics: Metrics, usage: UsageLog, usage_path: Callable[[], str | None]
) -> Handler:
    """The gateway's one middleware: request record and id, CORS, the OpenAI error envelope,
    then metrics and the access line. One layer rather than three: each middleware layer
    and each response-prepare hook is a coroutine and a frame more on every request."""
    meters = Meters(metrics)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        record = RequestRecord(request_id=_request_id(request), meters=meters)
        request[_RECORD] = record
        structlog.contextvars.bind_contextvars(request_id=record.request_id)
        status = 500
        try:
            if "Origin" in request.headers:
                allowed = allowed_origin(request)
                if allowed is not None:
                    answer = preflight(request, allowed)
                    if answer is not None:
                        status = answer.status
                        return answer
                    record.cors_origin = allowed
            try:
                response = await handler(request)
            except Exception as exc:
                response = error_response_for(request, exc)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            record.error = record.error or "client_disconnected"
            raise
        except ConnectionResetError:
            status = CLIENT_CLOSED
            record.error = record.error or "client_disconnected"
            raise
        finally:
            _finish(request, record, status, meters)
            if record.route_id is not None:
                _record_usage(usage, usage_path(), record, status)
            structlog.contextvars.unbind_contextvars("request_id")

    return middleware


def _record_usage(usage: UsageLog, path: str | None, record: RequestRecord, status: int) -> None:
    if path is None:
        return
    usage.write(
        path,
        {
            "request_id": record.request_id,
            "key": record.key,
            "model": record.model,
            "backend": record.backend,
            "status": status,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "duration_ms": round((time.monotonic() - record.started) * 1000, 2),
        },
    )


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: streamed responses send headers early, so add them here: the
    request id, the caller's rate-limit headers (as OpenAI sends them), CORS."""
    record = request.get(_RECORD)
    if record is not None:
        headers = response.headers
        headers[REQUEST_ID_HEADER] = record.request_id
        for name, value in record.limit_headers.items():
            headers.setdefault(name, value)
        if record.cors_origin is not None:
            add_cors_headers(response, record.cors_origin)


def _finish(request: web.Request, record: RequestRecord, status: int, meters: Meters) -> None:
    duration = time.monotonic() - record.started
    ttft = meters.finish(record, status, duration)
    if record.span is not None:
        record.span.finish(record, status)

    quiet = record.family in ("health", "metrics")
    handler = fast_json_handler(_ACCESS_LOGGER)
    if handler is not None and not _ACCESS_LOGGER.isEnabledFor(
        logging.DEBUG if quiet else logging.INFO
    ):
        return  # what structlog's filter_by_level would decide, before any work
    fields = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "key": record.key,
        "model": record.model,
        "backend": record.backend,
        "upstream_model": record.upstream_model,
        "upstream_status": record.upstream_status,
        "duration_ms": round(duration * 1000, 2),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "error": record.error,
        "attempts": record.attempts,
        "failures": record.failures or None,
        "seams": record.seams or None,
    }
    if record.routing is not None:
        fields["routing"] = record.routing
    if handler is None:
        (access_log.debug if quiet else access_log.info)("request", **fields)
        return
    # The same line structlog would write (see JsonLineHandler), without its layers.
    fields["event"] = "request"
    handler.write_event(
        "gateway.access", "debug" if quiet else "info", _merge_context(None, "", fields)
    )
