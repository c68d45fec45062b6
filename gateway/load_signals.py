"""Load signals scraped from each backend's own `/metrics`: requests running and waiting, KV
cache usage and size, in the dialects of vLLM, SGLang, llama.cpp and our worker."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from gateway.routing import Target

log = structlog.get_logger("gateway.load_signals")

# Metric name (as the parser reports it: counters lose `_total`) -> the signal it feeds.
RUNNING = {
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "sglang_num_running_reqs",  # SGLang >= 0.5.4
    "llamacpp:requests_processing",
    "worker_running_requests",
}
WAITING = {
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "sglang_num_queue_reqs",
    "llamacpp:requests_deferred",
    "worker_waiting_requests",
}
KV_USAGE = {  # a fraction, 0..1, whatever the name says
    "vllm:kv_cache_usage_perc",
    "sglang:token_usage",
    "sglang_token_usage",
    "llamacpp:kv_cache_usage_ratio",
    "worker_kv_cache_usage_perc",
}
CACHE_INFO = {"vllm:cache_config_info", "worker_cache_config_info"}
_WANTED = tuple(sorted(RUNNING | WAITING | KV_USAGE | CACHE_INFO))
# A backend without /metrics (404, not Prometheus text) is asked again this much later.
ABSENT_RETRY = 30.0


@dataclass(frozen=True, slots=True)
class Signals:
    """One scrape's reading. None: the backend does not export that signal."""

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    cache_tokens: int | None = None  # num_gpu_blocks x block_size
    at: float = 0.0  # time.monotonic() of the scrape
    ours: int = 0  # this gateway's own requests in flight there when the reading came

    def others(self) -> float | None:
        """Requests there that are not this gateway's (other gateways', other processes'),
        as of the reading; None when the backend does not say."""
        if self.running is None:
            return None
        return max(0.0, self.running + (self.waiting or 0.0) - self.ours)

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "running": self.running,
            "waiting": self.waiting,
            "kvUsage": self.kv_usage,
            "cacheTokens": self.cache_tokens,
            "ageSeconds": round(now - self.at, 2),
        }


def parse_signals(text: str, at: float) -> Signals:
    """Prometheus text -> Signals. Only the lines of the series wanted are parsed (a vLLM
    scrape is ~100 KB of histograms, parsed twice a second per backend); several engines
    behind one port (data parallel) add up."""
    lines = "\n".join(
        line for line in text.splitlines() if line.startswith(_WANTED) and "_bucket" not in line
    )
    running = waiting = kv = None
    cache_tokens = None
    for family in text_string_to_metric_families(lines + "\n"):
        for sample in family.samples:
            name = sample.name
            if name in RUNNING:
                running = (running or 0.0) + sample.value
            elif name in WAITING:
                waiting = (waiting or 0.0) + sample.value
            elif name in KV_USAGE:
                kv = max(kv or 0.0, sample.value)
            elif name in CACHE_INFO:
                labels = sample.labels
                try:
                    tokens = int(labels["num_gpu_blocks"]) * int(labels["block_size"])
                except (KeyError, ValueError):
                    continue
                cache_tokens = (cache_tokens or 0) + tokens
    return Signals(running, waiting, kv, cache_tokens, at)


def metrics_url(target: Target, path: str) -> URL:
    """`/metrics` at the backend's origin, where vLLM, SGLang and llama.cpp serve it (not
    under the `/v1` of its url)."""
    return target.base_url.with_path(path).with_query(None)


@dataclass
class LoadSignals:
    """The latest reading of every scraped backend, by `Target.key`."""

    readings: dict[str, Signals] = field(default_factory=dict)
    absent_until: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def fresh(self, key: str, now: float, stale_after: float) -> Signals | None:
        """The reading, unless it is older than `stale_after` seconds (then it says nothing)."""
        reading = self.readings.get(key)
        if reading is None or now - reading.at > stale_after:
            return None
        return reading

    def retain(self, keys: Iterable[str]) -> None:
        keep = set(keys)
        for table in (self.readings, self.absent_until, self.errors):
            for key in list(table):
                if key not in keep:
                    del table[key]

    async def scrape(
        self,
        session: aiohttp.ClientSession,
        target: Target,
        path: str,
        limit: float,
        ours: Callable[[], int] = lambda: 0,
    ) -> None:
        """One reading of `target`'s /metrics; `ours` tells this gateway's in-flight count
        there, taken when the reading arrives."""
        now = time.monotonic()
        if self.absent_until.get(target.key, 0.0) > now:
            return
        try:
            async with (
                asyncio.timeout(limit),
                session.get(
                    metrics_url(target, path),
                    headers=target.own_headers(),
                    allow_redirects=False,
                ) as response,
            ):
                if response.status != 200:
                    self._absent(target, f"http_{response.status}")
                    return
                text = await response.text(errors="replace")
        except TimeoutError:
            self.errors[target.key] = "timeout"
            return
        except (aiohttp.ClientError, OSError):
            self.errors[target.key] = "unreachable"
            return
        try:
            reading = parse_signals(text, time.monotonic())
            self.readings[target.key] = dataclasses.replace(reading, ours=ours())
        except ValueError:
            self._absent(target, "not_prometheus_text")
            return
        self.errors.pop(target.key, None)

    def _absent(self, target: Target, why: str) -> None:
        if target.key not in self.absent_until:
            log.info("backend has no load metrics; routing on in-flight only", backend=target.label)
        self.absent_until[target.key] = time.monotonic() + ABSENT_RETRY
        self.errors[target.key] = why
