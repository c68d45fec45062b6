"""Prometheus metrics of one gateway app, on a registry of its own (no process globals)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads by outcome.",
            ["outcome", "trigger"],
            registry=r,
        )
        self._models: frozenset[str] = frozenset()
        self.set_models(models)

    def set_models(self, models: Iterable[str]) -> None:
        self._models = frozenset(models)

    def model_label(self, model: str | None) -> str:
        """Only configured ids become label values: clients cannot blow up the series count."""
        if model is None:
            return "none"
        return model if model in self._models else OTHER

    def render(self) -> bytes:
        return generate_latest(self.registry)
