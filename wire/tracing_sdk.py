"""The OpenTelemetry SDK as gateway and worker use it: a tracer provider of their own (no
global), W3C trace context in and out, and spans batched to OTLP/HTTP off the event loop.

Configured by the standard variables: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS,
_TIMEOUT, _COMPRESSION, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG],
OTEL_PROPAGATORS, OTEL_BSP_* (queue size, batch size, delay). A collector that is slow or
down never reaches a request: a request only appends its ended spans to a bounded queue; a
full queue drops spans, and every dropped span is counted (`on_dropped`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import structlog
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from wire.tracing import OnDropped

log = structlog.get_logger("tracing")

SERVER = SpanKind.SERVER
CLIENT = SpanKind.CLIENT
# How long shutting down may wait for the last batch to reach the collector.
CLOSE_TIMEOUT = 5.0
_PROTOCOL = "http/protobuf"


class _CountingExporter(SpanExporter):
    """The OTLP exporter, with the spans of a batch it could not deliver counted."""

    def __init__(self, exporter: SpanExporter, on_dropped: OnDropped) -> None:
        self._exporter = exporter
        self._on_dropped = on_dropped

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._exporter.export(spans)
        if result is not SpanExportResult.SUCCESS:
            self._on_dropped("export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class _CountingBatchProcessor(BatchSpanProcessor):
    """The SDK's batch processor, which drops a span silently when its queue is full: here
    each such drop is counted as it happens."""

    def __init__(self, exporter: SpanExporter, on_dropped: OnDropped) -> None:
        super().__init__(exporter)
        self._on_dropped = on_dropped
        self._queue = self._batch_processor._queue  # a bounded deque (maxlen = queue size)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is not None and context.trace_flags.sampled:
            queue = self._queue
            if len(queue) == queue.maxlen:
                self._on_dropped("queue_full", 1)
        super().on_end(span)


def _resource(service_name: str) -> Resource:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES as the SDK reads them; `service_name`
    only when neither names the service."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


class Tracing:
    """One process's tracer and the pipeline behind it."""

    def __init__(self, provider: TracerProvider, tracer: trace.Tracer) -> None:
        self._provider = provider
        self._tracer = tracer

    @classmethod
    def from_environment(
        cls, service_name: str, on_dropped: OnDropped, env: Mapping[str, str] = os.environ
    ) -> Tracing:
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or _PROTOCOL
        )
        if protocol.strip() != _PROTOCOL:
            log.warning("only OTLP over http/protobuf is supported", configured=protocol)
        # The exporter reads its endpoint, headers, timeout and compression from OTEL_*.
        exporter = _CountingExporter(OTLPSpanExporter(), on_dropped)
        # shutdown_on_exit=False: an atexit flush to a dead collector would hold up exit.
        provider = TracerProvider(resource=_resource(service_name), shutdown_on_exit=False)
        provider.add_span_processor(_CountingBatchProcessor(exporter, on_dropped))
        return cls(provider, provider.get_tracer(service_name))

    def server_span(
        self,
        name: str,
        headers: Mapping[str, str],
        start_ns: int,
        attributes: Mapping[str, Any],
    ) -> Span:
        """A span for a request received, continuing the trace its headers carry."""
        return self._tracer.start_span(
            name,
            context=propagate.extract(headers),
            kind=SERVER,
            attributes=attributes,
            start_time=start_ns,
        )

    def child_span(
        self, parent: Span, name: str, attributes: Mapping[str, Any], kind: SpanKind = CLIENT
    ) -> Span:
        context: Context = trace.set_span_in_context(parent)
        return self._tracer.start_span(name, context=context, kind=kind, attributes=attributes)

    @staticmethod
    def inject(span: Span, headers: MutableMapping[str, str]) -> None:
        """`traceparent` (and whatever else OTEL_PROPAGATORS names) for a request sent
        within `span`."""
        propagate.inject(headers, context=trace.set_span_in_context(span))

    @staticmethod
    def set_error(span: Span, error_type: str) -> None:
        """Marks a failed span; only the error's kind, never a message that could carry a
        prompt or a key."""
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR))

    async def close(self) -> None:
        """Flushes what is queued, waiting CLOSE_TIMEOUT at most: a dead collector must not
        hold up shutdown (the flush goes on in a daemon thread the exit will not wait for)."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def shutdown() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=shutdown, name="tracing-shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await done.wait()
        except TimeoutError:
            log.warning("traces not flushed: the collector did not answer", seconds=CLOSE_TIMEOUT)
