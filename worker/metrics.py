"""Prometheus metrics of one worker, on a registry of its own (no process globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("worker_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter("worker_generated_tokens", "Generated tokens", registry=r)
        self.rejected = Counter("worker_rejected", "Requests refused: queue full", registry=r)
        self.cancelled = Counter(
            "worker_cancelled", "Requests whose client went away before the end", registry=r
        )
        self.ttft = Histogram(
            "worker_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "worker_request_duration_seconds",
            "Request duration",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("worker_running_requests", "Requests being generated", registry=r)
        self.waiting = Gauge("worker_waiting_requests", "Requests waiting for a slot", registry=r)
        # Read by the gateway's cache-aware routing, as it reads vLLM's kv_cache_usage_perc
        # and cache_config_info.
        self.kv_usage = Gauge(
            "worker_kv_cache_usage_perc", "Fraction of the KV cache in use (0-1)", registry=r
        )
        self.cache_info = Gauge(
            "worker_cache_config_info",
            "KV cache size: num_gpu_blocks x block_size tokens",
            ["block_size", "num_gpu_blocks"],
            registry=r,
        )
        # As vLLM's prefix_cache_queries / _hits (counted in tokens); 0 with prefix caching off.
        self.prefix_queries = Gauge(
            "worker_prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.prefix_hits = Gauge(
            "worker_prefix_cache_hits_tokens",
            "Prompt tokens found in the prefix cache (their prefill skipped)",
            registry=r,
        )
        self._spans_dropped: Counter | None = None  # only while tracing is on

    def count_dropped_spans(self, reason: str, spans: int) -> None:
        """Spans the trace exporter lost (called from its thread too: counters are locked)."""
        if self._spans_dropped is None:
            self._spans_dropped = Counter(
                "worker_trace_spans_dropped",
                "Spans not delivered to the OTLP collector: queue_full, export_failed.",
                ["reason"],
                registry=self.registry,
            )
        self._spans_dropped.labels(reason).inc(spans)

    def watch(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_usage: Callable[[], float] | None = None,
        cache_tokens: int = 0,
        block_size: int = 0,
        prefix: tuple[Callable[[], float], Callable[[], float]] | None = None,
    ) -> None:
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        if kv_usage is not None:
            self.kv_usage.set_function(kv_usage)
        if cache_tokens and block_size:
            self.cache_info.labels(str(block_size), str(cache_tokens // block_size)).set(1)
        if prefix is not None:
            self.prefix_queries.set_function(prefix[0])
            self.prefix_hits.set_function(prefix[1])

    def render(self) -> bytes:
        return generate_latest(self.registry)
