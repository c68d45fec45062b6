"""Prometheus metrics of one gateway app, on a registry of its own (no process globals).

Under `--workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR: every process then keeps its
values in files there, and a scrape of any one process reads them all (promise 10)."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.backends import Backends
from gateway.routing import Route

OTHER = "other"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self, models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Where --workers processes share their values; None for a single process.
        self._shared_dir = multiprocess_dir()
        self.multiprocess = self._shared_dir is not None
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by public model, route and status.",
            ["model", "route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the end of the response (streams: to the last event).",
            ["model", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request to the first event relayed to the client (streams only).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Backend failures by kind (refused, timeout_*, died, http_5xx, ...).",
            ["model", "kind"],
            registry=r,
        )
        self.stream_resumes = Counter(
            "gateway_stream_resumes_total",
            "Streams cut after their first byte: resumed on another backend (one per seam), "
            "refused (reason: why not) or failed (no continuation came).",
            ["model", "outcome", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Requests being proxied right now.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.tokens = Counter(
            "gateway_tokens_total",
            "Tokens reported by backends in `usage`.",
            ["model", "type"],
            registry=r,
        )
        # Labelled by key *name* (configured, so bounded), never by the key itself.
        self.key_requests = Counter(
            "gateway_key_requests_total",
            "Requests per client key, public model and status.",
            ["key", "model", "status"],
            registry=r,
        )
        self.key_tokens = Counter(
            "gateway_key_tokens_total",
            "Tokens per client key and public model, from usage.",
            ["key", "model", "type"],
            registry=r,
        )
        self.routing_decisions = Counter(
            "gateway_routing_decisions_total",
            "Cache-aware routing decisions by reason: session, prefix, balance or cold.",
            ["model", "reason"],
            registry=r,
        )
        self.routing_matched = Histogram(
            "gateway_routing_matched_prefix_tokens",
            "Cache-aware routing: the estimated tokens of the request the chosen backend holds.",
            ["model"],
            buckets=(0, 64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads by outcome.",
            ["outcome", "trigger"],
            registry=r,
        )
        # What an alert needs that the counter cannot say: is the config serving now the file?
        self.last_reload_ok = Gauge(
            "gateway_config_last_reload_successful",
            "0 after a reload that failed (the previous config keeps serving), until one succeeds.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.last_reload_ok.set(1)
        self.redis_errors = Counter(
            "gateway_redis_errors_total",
            "Redis calls that failed (the limits were then kept in this process, or refused).",
            registry=r,
        )
        self.usage_log_errors = Counter(
            "gateway_usage_log_errors_total",
            "Usage log lines lost: the file could not be written (write) or the writer was too "
            "far behind (queue_full).",
            ["reason"],
            registry=r,
        )
        self._redis_up: Gauge | None = None  # only when a redisUrl is configured
        self._spans_dropped: Counter | None = None  # only while tracing is on
        self._models: frozenset[str] = frozenset()
        self.set_models(models)
        self._backends: _BackendGauges | None = None

    def stream_resume_counts(self) -> dict[str, int]:
        """Seams resumed, and cut streams refused or failed, by this process (for /debug)."""
        counts = {"resumed": 0, "refused": 0, "failed": 0}
        for metric in self.stream_resumes.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels["outcome"]
                    counts[outcome] = counts.get(outcome, 0) + int(sample.value)
        return counts

    def watch_backends(
        self, backends: Backends, routes: Callable[[], Mapping[str, Route]] = dict
    ) -> None:
        """Per-backend load and health, and per model how many of its backends take requests,
        read from the live registry and the current routes at scrape time."""
        if self.multiprocess:
            # Another process cannot run our collector: mirror the state into shared files.
            self._backends = _BackendGauges(backends, routes, self.registry)
        else:
            self.registry.register(_BackendCollector(backends, routes))

    def sync(self) -> None:
        """Under --workers, copies this process's backend state into the shared files."""
        if self._backends is not None:
            self._backends.sync()

    def set_redis_up(self, up: bool) -> None:
        if self._redis_up is None:
            self._redis_up = Gauge(
                "gateway_redis_up",
                "1 while the configured Redis answers (the lowest over --workers processes).",
                registry=self.registry,
                multiprocess_mode="livemin",
            )
        self._redis_up.set(1 if up else 0)

    def count_dropped_spans(self, reason: str, spans: int) -> None:
        """Spans the trace exporter lost (called from its thread too: counters are locked)."""
        if self._spans_dropped is None:
            self._spans_dropped = Counter(
                "gateway_trace_spans_dropped",
                "Spans not delivered to the OTLP collector: queue_full (the collector is slow "
                "or down), export_failed.",
                ["reason"],
                registry=self.registry,
            )
        self._spans_dropped.labels(reason).inc(spans)

    def set_models(self, models: Iterable[str]) -> None:
        self._models = frozenset(models)

    def model_label(self, model: str | None) -> str:
        """Only configured ids become label values: clients cannot blow up the series count."""
        if model is None:
            return "none"
        return model if model in self._models else OTHER

    def render(self) -> bytes:
        if self._shared_dir is None:
            return generate_latest(self.registry)
        self.sync()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self._shared_dir)
        return generate_latest(registry)


# The per-backend series, in the order of _backend_rows' columns: (name, help, kind, how the
# values of several --workers processes combine).
_BACKEND_SERIES = (
    ("gateway_backend_in_flight", "Requests in flight per backend.", "gauge", "livesum"),
    (
        "gateway_backend_up",
        "1 when the backend takes requests, 0 while a circuit breaker has it ejected "
        "(the lowest over --workers processes).",
        "gauge",
        "livemin",
    ),
    ("gateway_backend_ejections", "Times the circuit breaker ejected the backend.", "counter", ""),
    ("gateway_backend_requests", "Attempts sent to the backend.", "counter", ""),
    (
        "gateway_backend_failures",
        "Attempts that failed (connect, timeout, 5xx, died).",
        "counter",
        "",
    ),
)


_MODEL_BACKENDS_UP = (
    "gateway_model_backends_up",
    "Backends of the model that take requests (0: every one is ejected, requests get 503).",
)


def _up(backends: Backends, route: Route, now: float) -> int:
    states = backends.states
    return sum(
        1
        for target in route.targets
        if (state := states.get(target.key)) is None or state.health(now) != "ejected"
    )


def _model_rows(backends: Backends, routes: Mapping[str, Route]) -> dict[str, float]:
    """Per public model (configured ids only): its backends that are not ejected."""
    now = time.monotonic()
    return {public_id: float(_up(backends, route, now)) for public_id, route in routes.items()}


def _backend_rows(backends: Backends) -> dict[str, list[float]]:
    """Per backend label: in flight, up, ejections, requests, failures."""
    now = time.monotonic()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
    for state in backends.states.values():
        row = totals[state.label]
        row[0] += state.in_flight
        row[1] = max(row[1], 1.0 if state.health(now) != "ejected" else 0.0)
        row[2] += state.ejections
        row[3] += state.requests
        row[4] += state.failures
    return totals


class _BackendCollector(Collector):
    """Labels are `host:port` of configured backends only: bounded by the config."""

    def __init__(self, backends: Backends, routes: Callable[[], Mapping[str, Route]]) -> None:
        self._backends = backends
        self._routes = routes

    def collect(self) -> Iterator[Metric]:
        families = [
            (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=["backend"]
            )
            for name, doc, kind, _ in _BACKEND_SERIES
        ]
        for label, row in sorted(_backend_rows(self._backends).items()):
            for family, value in zip(families, row, strict=True):
                family.add_metric([label], value)
        yield from families
        per_model = GaugeMetricFamily(*_MODEL_BACKENDS_UP, labels=["model"])
        for model, up in _model_rows(self._backends, self._routes()).items():
            per_model.add_metric([model], up)
        yield per_model


class _BackendGauges:
    """The same series as _BackendCollector, as values in the multiprocess files: gauges
    combined as _BACKEND_SERIES says, counters as sums of what each process added."""

    def __init__(
        self,
        backends: Backends,
        routes: Callable[[], Mapping[str, Route]],
        registry: CollectorRegistry,
    ) -> None:
        self._backends = backends
        self._routes = routes
        # The lowest over the processes: one whose breakers ejected them all answers 503.
        self._per_model = Gauge(
            *_MODEL_BACKENDS_UP, ["model"], registry=registry, multiprocess_mode="livemin"
        )
        self._series: list[Gauge | Counter] = [
            Gauge(name, doc, ["backend"], registry=registry, multiprocess_mode=mode)
            if kind == "gauge"
            else Counter(name, doc, ["backend"], registry=registry)
            for name, doc, kind, mode in _BACKEND_SERIES
        ]
        self._counted: dict[tuple[str, int], float] = defaultdict(float)

    def sync(self) -> None:
        for model, up in _model_rows(self._backends, self._routes()).items():
            self._per_model.labels(model).set(up)
        for label, row in _backend_rows(self._backends).items():
            for index, (series, value) in enumerate(zip(self._series, row, strict=True)):
                if isinstance(series, Gauge):
                    series.labels(label).set(value)
                    continue
                added = value - self._counted[label, index]
                if added > 0:
                    series.labels(label).inc(added)
                    self._counted[label, index] = value
