"""Prometheus metrics of one gateway app, on a registry of its own (no process globals)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.backends import Backends

OTHER = "other"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Requests being proxied right now.",
            ["model"],
            registry=r,
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
        self.reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads by outcome.",
            ["outcome", "trigger"],
            registry=r,
        )
        self._models: frozenset[str] = frozenset()
        self.set_models(models)

    def watch_backends(self, backends: Backends) -> None:
        """Per-backend load and health, read from the live registry at scrape time."""
        self.registry.register(_BackendCollector(backends))

    def set_models(self, models: Iterable[str]) -> None:
        self._models = frozenset(models)

    def model_label(self, model: str | None) -> str:
        """Only configured ids become label values: clients cannot blow up the series count."""
        if model is None:
            return "none"
        return model if model in self._models else OTHER

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BackendCollector(Collector):
    """Labels are `host:port` of configured backends only: bounded by the config."""

    def __init__(self, backends: Backends) -> None:
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
        for state in self._backends.states.values():
            row = totals[state.label]
            row[0] += state.in_flight
            row[1] = max(row[1], 1.0 if state.health(now) != "ejected" else 0.0)
            row[2] += state.ejections
            row[3] += state.requests
            row[4] += state.failures
        families = [
            GaugeMetricFamily(
                "gateway_backend_in_flight", "Requests in flight per backend.", labels=["backend"]
            ),
            GaugeMetricFamily(
                "gateway_backend_up",
                "1 when the backend takes requests, 0 while its circuit breaker has it ejected.",
                labels=["backend"],
            ),
            CounterMetricFamily(
                "gateway_backend_ejections",
                "Times the circuit breaker ejected the backend.",
                labels=["backend"],
            ),
            CounterMetricFamily(
                "gateway_backend_requests", "Attempts sent to the backend.", labels=["backend"]
            ),
            CounterMetricFamily(
                "gateway_backend_failures",
                "Attempts that failed (connect, timeout, 5xx, died).",
                labels=["backend"],
            ),
        ]
        for label, row in sorted(totals.items()):
            for family, value in zip(families, row, strict=True):
                family.add_metric([label], value)
        yield from families
