"""`--workers N` and several gateway processes, as real processes: one port shared by the
workers, one scrape that counts all of them, reloads and restarts that reach every worker, and
key limits that hold across processes through a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.gateway.redis_server import free_port

ALICE = "sk-alice-0123456789abcdef"
pytestmark = pytest.mark.timeout(90)
TIMEOUT = aiohttp.ClientTimeout(total=10)


class Served:
    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "gateway", "--config", str(config), "--host"]
        command += ["127.0.0.1", "--port", str(self.port), *args]
        # A file, not a pipe: nobody reads a pipe while the test runs, and a full one would
        # block every worker's logging.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the fixture)
        self.process = subprocess.Popen(
            command,
            env={**os.environ, "LOG_FORMAT": "json", **(env or {})},
            stdout=self.log,
            stderr=self.log,
            # Its own process group, so the test can tell whether any worker outlived it.
            start_new_session=True,
        )

    async def wait_ready(self) -> None:
        for _ in range(300):
            assert self.process.poll() is None, self.output()
            try:
                status, _ = await get(self.url + "/health")
                if status == 200:
                    return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("gateway did not become healthy")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        return self.output()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode()


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(config: Path, *args: str, **kwargs: Any) -> Served:
        started.append(Served(config, *args, **kwargs))
        return started[-1]

    yield start
    for served in started:
        if served.process.poll() is None:
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait()
        served.log.close()


async def get(url: str, **kwargs: Any) -> tuple[int, Any]:
    """A new connection each time: SO_REUSEPORT spreads connections, not requests."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session,
        session.get(url, **kwargs) as response,
    ):
        text = await response.text()
        return response.status, json.loads(text) if text.startswith("{") else text


async def chat(url: str, key: str | None = None) -> int:
    connector = aiohttp.TCPConnector(force_close=True)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        body = {"model": "llama", "messages": []}
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            await r.read()
            return r.status


async def worker_pids(url: str, want: int, seconds: float = 15.0) -> dict[str, int]:
    """worker index -> pid, from /debug over fresh connections until `want` answered.
    Bounded by time, not by a count of tries: `wait_ready` returns when the first worker
    answers, and a sibling still starting on a busy machine must not fail the test."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _, debug = await get(url + "/debug")
        seen[debug["process"]["worker"]] = debug["process"]["pid"]
        if len(seen) == want:
            return seen
    raise AssertionError(f"only workers {seen} answered in {seconds:g} s")


def log_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def write(path: Path, backend: Any, **extra: Any) -> Path:
    config = {"endpoints": {"llama": {"url": backend.url}}, **extra}
    path.write_text(json.dumps(config))
    return path


async def test_workers_share_one_port_and_one_scrape_counts_them_all(
    tmp_path, backend, serve
) -> None:
    metrics_dir = tmp_path / "metrics"
    config = write(tmp_path / "gateway.json", backend)
    served = serve(config, "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    await served.wait_ready()
    pids = await worker_pids(served.url, 2)
    assert len(set(pids.values())) == 2

    statuses = [await chat(served.url) for _ in range(20)]
    assert statuses == [200] * 20
    counted = 'gateway_requests_total{model="llama",route="chat.completions",status="200"} 20.0'
    for _ in range(4):  # whichever worker answers the scrape
        _, text = await get(served.url + "/metrics")
        assert counted in text
    assert 'gateway_backend_requests_total{backend="127.0.0.1:' in text
    assert 'gateway_model_backends_up{model="llama"} 1.0' in text
    assert "gateway_config_last_reload_successful 1.0" in text

    # A worker that dies is replaced; what it counted stays counted.
    os.kill(pids["0"], signal.SIGKILL)
    replaced = dict(pids)
    for _ in range(600):
        try:
            _, debug = await get(served.url + "/debug")
        except aiohttp.ClientConnectionError:
            # Connections the kernel had queued for the killed worker are reset with it.
            continue
        replaced[debug["process"]["worker"]] = debug["process"]["pid"]
        if replaced["0"] != pids["0"]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("worker 0 was not restarted")
    _, text = await get(served.url + "/metrics")
    assert counted in text
    assert 'gateway_in_flight_requests{model="llama"} 0.0' in text

    stderr = served.stop()
    assert served.process.returncode == 0
    assert not any(alive(pid) for pid in replaced.values())
    died = [line for line in log_lines(stderr) if line.get("event") == "worker died"]
    assert [(line["worker"], line["exit_code"]) for line in died] == [(0, -9)]
    assert list(metrics_dir.glob("*.db")), "an operator's own metrics folder is kept"


async def test_a_reload_reaches_every_worker(tmp_path, backend, serve) -> None:
    config = write(tmp_path / "gateway.json", backend)
    served = serve(config, "--workers", "2")
    await served.wait_ready()
    await worker_pids(served.url, 2)
    config.write_text(
        json.dumps({"endpoints": {"llama": {"url": backend.url}, "qwen": {"url": backend.url}}})
    )
    async with (  # no waiting for the file watcher: ask for it
        aiohttp.ClientSession() as session,
        session.post(served.url + "/reload") as response,
    ):
        assert response.status == 200

    async def every_worker_lists_qwen() -> bool:
        for _ in range(12):
            _, models = await get(served.url + "/v1/models")
            if "qwen" not in [m["id"] for m in models["data"]]:
                return False
        return True

    for _ in range(50):
        if await every_worker_lists_qwen():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("a worker kept the old config")
    served.stop()
    assert served.process.returncode == 0


async def test_limits_hold_across_two_gateway_processes(
    tmp_path, backend, redis_server, serve
) -> None:
    keys = [{"name": "alice", "key": ALICE, "rpm": 5}]
    config = write(tmp_path / "gateway.json", backend, keys=keys, redisUrl=redis_server.url)
    first, second = serve(config), serve(config)
    await asyncio.gather(first.wait_ready(), second.wait_ready())
    statuses = [await chat(gw.url, ALICE) for gw in (first, second) * 5]
    assert sorted(statuses) == [200] * 5 + [429] * 5
    assert statuses[:5] == [200] * 5


async def test_limits_hold_across_workers_with_redis(
    tmp_path, backend, redis_server, serve
) -> None:
    keys = [{"name": "alice", "key": ALICE, "rpm": 6}]
    config = write(tmp_path / "gateway.json", backend, keys=keys, redisUrl=redis_server.url)
    served = serve(config, "--workers", "2")
    await served.wait_ready()
    await worker_pids(served.url, 2)  # both are serving, so both will take requests
    statuses = [await chat(served.url, ALICE) for _ in range(12)]
    assert statuses == [200] * 6 + [429] * 6
    served.stop()


async def test_workers_without_redis_warn_that_limits_are_per_process(
    tmp_path, backend, serve
) -> None:
    keys = [{"name": "alice", "key": ALICE, "rpm": 6}]
    served = serve(write(tmp_path / "gateway.json", backend, keys=keys), "--workers", "2")
    await served.wait_ready()
    assert "limits are counted per process" in served.stop()


def test_workers_need_a_fixed_port(tmp_path) -> None:
    config = tmp_path / "gateway.json"
    config.write_text(json.dumps({"endpoints": {"llama": {"url": "http://127.0.0.1:9/v1"}}}))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "--port", "0", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--workers needs a fixed --port" in result.stderr
