"""Per-request record, request ids, and the access line + metrics written when a request ends."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from gateway.metrics import Metrics
from gateway.usagelog import UsageLog
from wire.errors import Handler

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Status for a client that went away before the response ended (nginx's convention).
CLIENT_CLOSED = 499

access_log = structlog.get_logger("gateway.access")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    route: str = "other"
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
    attempts: int = 0
    # Every backend failure this request saw, retried or not (metrics count each).
    failures: list[str] = field(default_factory=list)

    def fail(self, kind: str) -> None:
        """The backend failed after its response started: the request ends in this error."""
        self.error = kind
        self.failures.append(kind)


_RECORD = web.RequestKey("record", RequestRecord)


def record_of(request: web.Request) -> RequestRecord:
    return request[_RECORD]


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    # A client-chosen id is kept only if it is safe to put in logs and headers.
    return given if _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex


def access_middleware(
    metrics: Metrics, usage: UsageLog, usage_path: Callable[[], str | None]
) -> Handler:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        record = RequestRecord(request_id=_request_id(request))
        request[_RECORD] = record
        structlog.contextvars.bind_contextvars(request_id=record.request_id)
        status = 500
        try:
            response = await handler(request)
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
            _finish(request, record, status, metrics)
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


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: streamed responses send headers early, so add it here
    (and the caller's rate-limit headers, as OpenAI sends them)."""
    record = request.get(_RECORD)
    if record is not None:
        response.headers[REQUEST_ID_HEADER] = record.request_id
        for name, value in record.limit_headers.items():
            response.headers.setdefault(name, value)


def _finish(request: web.Request, record: RequestRecord, status: int, metrics: Metrics) -> None:
    now = time.monotonic()
    duration = now - record.started
    model = metrics.model_label(record.route_id or record.model)
    metrics.requests.labels(model, record.route, str(status)).inc()
    metrics.duration.labels(model, record.route).observe(duration)
    ttft = None
    if record.first_byte_at is not None:
        ttft = record.first_byte_at - record.started
        if record.streamed:
            metrics.ttft.labels(model).observe(ttft)
    for kind in record.failures:
        metrics.upstream_errors.labels(model, kind).inc()
    if record.prompt_tokens is not None:
        metrics.tokens.labels(model, "prompt").inc(record.prompt_tokens)
    if record.completion_tokens is not None:
        metrics.tokens.labels(model, "completion").inc(record.completion_tokens)
    if record.key is not None:
        metrics.key_requests.labels(record.key, model, str(status)).inc()
        for kind, count in (
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
        ):
            if count:
                metrics.key_tokens.labels(record.key, model, kind).inc(count)

    quiet = record.route in ("health", "metrics")
    log = access_log.debug if quiet else access_log.info
    log(
        "request",
        method=request.method,
        path=request.path,
        status=status,
        key=record.key,
        model=record.model,
        backend=record.backend,
        upstream_model=record.upstream_model,
        upstream_status=record.upstream_status,
        duration_ms=round(duration * 1000, 2),
        ttft_ms=None if ttft is None else round(ttft * 1000, 2),
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        error=record.error,
        attempts=record.attempts,
        failures=record.failures or None,
    )
