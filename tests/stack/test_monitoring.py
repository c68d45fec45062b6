"""The shipped alert rules and Grafana dashboard, checked against a real Prometheus (Debian's
`prometheus` package, which `make test` installs when missing) scraping the real gateway:
promtool accepts the files, every alert fires when its condition is made true, and every
dashboard query returns data, so none names a metric or label the gateway does not have."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from gateway.app import build_app
from gateway.server import bound_port, start
from tests.gateway.backend import FakeBackend, Received, chunk, default_handler, sse, start_sse
from tests.gateway.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "config/alerts.yml"
PROMETHEUS_CONFIG = ROOT / "config/prometheus.yml"
DASHBOARD = ROOT / "config/grafana/dashboards/llm-gateway.json"
# What Grafana puts in place of the dashboard's variables: the `All` value of $model, and a
# rate window that holds every sample of this short test.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
API_ROUTES = 'route=~"chat.completions|completions|embeddings|passthrough"'
# Over the alert's 5 s threshold, so the slow model's p95 time to first token fires it.
SLOW_FIRST_TOKEN = 5.5
KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs Debian's prometheus package")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


@dataclass
class Query:
    panel: str
    expr: str
    legend: str


def dashboard_queries() -> list[Query]:
    """Every query of every panel, Grafana variables filled in."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[Query]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
                yield Query(panel["title"], expr, target.get("legendFormat", ""))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(gateway_\w+|up)\b", expr))


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by."""
    names = set()
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        names |= {name.strip() for name in group.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return names


# --- promtool ----------------------------------------------------------------------------------


def test_promtool_accepts_the_shipped_rules_and_config() -> None:
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"{len(alert_rules())} rules found" in rules.stdout
    # The config check also loads the rule files it names.
    config = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout


def test_promtool_rejects_a_broken_rule(tmp_path) -> None:
    broken = yaml.safe_load(ALERTS.read_text())
    broken["groups"][0]["rules"][0]["expr"] = "sum by (model (gateway_requests_total)"
    path = tmp_path / "alerts.yml"
    path.write_text(yaml.safe_dump(broken))
    assert promtool("check", "rules", str(path)).returncode != 0


# --- a real Prometheus scraping the real gateway ------------------------------------------------


class NotReady(Exception):
    """Prometheus listens before its storage is ready, and answers 503 until it is."""


class Prometheus:
    """Debian's prometheus on loopback, scraping every second and evaluating the shipped rules."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "gateway",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }
        self._config = directory / "prometheus.yml"
        self._config.write_text(yaml.safe_dump(config))
        self._data = directory / "data"
        self._log = directory / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={self._config}",
                    f"--storage.tsdb.path={self._data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def log(self) -> str:
        return self._log.read_text(errors="replace")[-4000:]

    async def query(self, http: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        async with http.get(self.url + "/api/v1/query", params={"query": expr}) as response:
            if response.status == 503:
                raise NotReady(await response.text())
            body = await response.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    async def until(self, http: aiohttp.ClientSession, what: str, check: Any) -> Any:
        """Polls until `check` returns something truthy (Prometheus scrapes once a second)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self._process is not None and self._process.poll() is None, self.log()
            try:
                found = await check()
            except (aiohttp.ClientConnectionError, NotReady):
                found = None
            if found:
                return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"Prometheus: {what} not seen in 60 s\n{self.log()}")

    async def labels(self, http: aiohttp.ClientSession, expr: str) -> set[str]:
        """Every label name of the series of the metrics `expr` names."""
        params = [("match[]", name) for name in sorted(metric_names(expr))]
        async with http.get(self.url + "/api/v1/labels", params=params) as response:
            return set((await response.json())["data"])

    async def total(self, http: aiohttp.ClientSession, expr: str) -> float | None:
        result = await self.query(http, expr)
        return float(result[0]["value"][1]) if result else None


class SlowFirstToken:
    """A backend whose streams start after SLOW_FIRST_TOKEN seconds once `slow` is set."""

    def __init__(self) -> None:
        self.slow = False

    async def __call__(self, request: web.Request, received: Received) -> web.StreamResponse:
        payload = received.json()
        if not payload.get("stream"):
            return await default_handler(request, received)
        if self.slow:
            await asyncio.sleep(SLOW_FIRST_TOKEN)
        response = await start_sse(request)
        await response.write(sse(chunk(payload["model"], "Hi", "stop")))
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def backends() -> AsyncIterator[tuple[FakeBackend, FakeBackend, SlowFirstToken]]:
    slow_handler = SlowFirstToken()
    fast, slow = await FakeBackend().start(), await FakeBackend(handler=slow_handler).start()
    yield fast, slow, slow_handler
    await fast.stop()
    await slow.stop()


async def status_of(client: openai.AsyncOpenAI, model: str, stream: bool = False) -> int:
    try:
        if stream:
            chunks = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            [c async for c in chunks]
        else:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}]
            )
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


async def traffic(clients: dict[str, openai.AsyncOpenAI]) -> list[int]:
    """One wave: streams and plain requests, a dead model, a rate-limited key."""
    alice, bob = clients["alice"], clients["bob"]
    calls = [
        status_of(alice, "chat"),
        status_of(alice, "chat"),
        status_of(alice, "chat", stream=True),
        status_of(alice, "chat", stream=True),
        status_of(alice, "slow", stream=True),
        status_of(alice, "dead"),
        status_of(bob, "chat"),
    ]
    statuses = list(await asyncio.gather(*calls))
    # Ejected after one failure, so 503 at once: each status a series before the second wave.
    statuses.append(await status_of(alice, "dead"))
    statuses.append(await status_of(bob, "chat"))  # over bob's rpm: 429
    return statuses


async def reload(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + "/reload") as response:
        return response.status


async def test_every_alert_fires_and_every_dashboard_query_has_data(
    tmp_path, backends, http
) -> None:
    fast, slow, slow_handler = backends
    redis = RedisServer(tmp_path).start()
    config = {
        "endpoints": {
            "chat": {"url": fast.url},
            "slow": {"url": slow.url},
            "dead": {"url": f"http://127.0.0.1:{free_port()}/v1"},
        },
        "retries": 0,
        "circuitBreaker": {"failures": 1, "cooldown": 600},
        "keys": [
            {"name": "alice", "key": KEYS["alice"]},
            {"name": "bob", "key": KEYS["bob"], "rpm": 1},
        ],
        "redisUrl": redis.url,
    }
    config_path = tmp_path / "gateway.json"
    config_path.write_text(json.dumps(config))
    runner = await start(build_app(config_path, watch=False), "127.0.0.1", 0)
    gateway = f"http://127.0.0.1:{bound_port(runner)}"
    # A second target that never answers: what GatewayDown reads.
    prometheus = Prometheus(tmp_path, [gateway.removeprefix("http://"), f"127.0.0.1:{free_port()}"])
    clients = {
        name: openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0)
        for name, key in KEYS.items()
    }
    api_total = f"sum(gateway_requests_total{{{API_ROUTES}}})"
    try:
        prometheus.start()
        # Wave 1: every series the queries read exists before the wave that moves the rates.
        first = await traffic(clients)
        assert first == [200, 200, 200, 200, 200, 502, 200, 503, 429]
        assert await reload(http, gateway) == 200
        await prometheus.until(
            http, "wave 1", lambda: _equals(prometheus.total(http, api_total), len(first))
        )

        # Wave 2: Redis goes away, the slow model turns slow, a reload fails.
        redis.stop()
        slow_handler.slow = True
        second = await traffic(clients)
        assert second[4:6] + second[7:8] == [200, 503, 503]  # every backend of `dead` ejected
        config_path.write_text("{broken")
        assert await reload(http, gateway) == 400
        done = len(first) + len(second)
        await prometheus.until(
            http, "wave 2", lambda: _equals(prometheus.total(http, api_total), done)
        )
        for gauge in ("gateway_redis_up", "gateway_config_last_reload_successful"):
            await prometheus.until(
                http, f"{gauge} 0", lambda g=gauge: _equals(prometheus.total(http, g), 0)
            )

        # Data alone does not prove a label exists (`sum by (typo)` answers too): every label
        # matched or grouped by must be one the metrics named have, and legends name labels
        # the series have.
        wrong = []
        for query in dashboard_queries():
            result = await prometheus.query(http, query.expr)
            if not result:
                wrong.append(f"{query.panel}: no data: {query.expr}")
            unknown = label_names(query.expr) - await prometheus.labels(http, query.expr)
            if unknown:
                wrong.append(f"{query.panel}: unknown labels {unknown}: {query.expr}")
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", query.legend):
                if not all(label in series["metric"] for series in result):
                    wrong.append(f"{query.panel}: legend names {label}, not in {query.expr}")
        assert not wrong, "dashboard queries:\n" + "\n".join(wrong)
        models = await _label_values(http, prometheus.url, "model", "gateway_requests_total")
        assert {"chat", "slow", "dead"} <= set(models)  # the dashboard's $model variable

        rules = alert_rules()
        for name, rule in rules.items():
            assert await prometheus.query(http, rule["expr"]), f"{name}: no data"
            unknown = label_names(rule["expr"]) - await prometheus.labels(http, rule["expr"])
            assert not unknown, f"{name}: unknown labels {unknown}"
        # Prometheus' own evaluation of the loaded rules: each one pending or firing.
        active = await prometheus.until(
            http, "every alert active", lambda: _active_alerts(http, prometheus.url, set(rules))
        )
        assert active == set(rules)
        fired = {
            alert["labels"]["alertname"]: alert["labels"]
            for alert in await _alerts(http, prometheus.url)
        }
        for name, rule in rules.items():  # what the annotations' templates read
            text = json.dumps(rule.get("annotations", {}))
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in fired[name], f"{name}: annotations read $labels.{label}"
        assert fired["GatewayModelUnavailable"]["model"] == "dead"
        assert fired["GatewayErrorRatioHigh"]["model"] == "dead"
        assert fired["GatewayTimeToFirstTokenHigh"]["model"] == "slow"
    finally:
        prometheus.stop()
        redis.stop()
        for client in clients.values():
            await client.close()
        await runner.cleanup()


async def _equals(value: Any, expected: float) -> bool:
    return await value == expected


async def _alerts(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(url + "/api/v1/alerts") as response:
        return (await response.json())["data"]["alerts"]


async def _active_alerts(http: aiohttp.ClientSession, url: str, wanted: set[str]) -> set[str]:
    names = {alert["labels"]["alertname"] for alert in await _alerts(http, url)}
    return names if names >= wanted else set()


async def _label_values(
    http: aiohttp.ClientSession, url: str, label: str, metric: str
) -> list[str]:
    async with http.get(f"{url}/api/v1/label/{label}/values", params={"match[]": metric}) as r:
        return (await r.json())["data"]
