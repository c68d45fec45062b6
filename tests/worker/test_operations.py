"""Health, ping, metrics, auth, logs without secrets, startup while loading, clean shutdown."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.worker.conftest import API_KEY, WorkerProcess, start_worker, wait_ready


async def test_health_ping_and_metrics(worker: WorkerProcess, client: openai.AsyncOpenAI) -> None:
    await client.completions.create(model="demo", prompt="metrics", max_tokens=3)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{worker.origin}/health") as r:
            assert r.status == 200
            health = await r.json()
        async with http.get(f"{worker.origin}/ping") as r:
            assert r.status == 200
        async with http.get(f"{worker.origin}/metrics") as r:
            assert r.status == 200
            metrics = await r.text()
    assert health["status"] == "ok"
    assert health["model"] == "demo"
    assert health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["max_batch_size"] == 16
    assert health["kv_cache_tokens"] >= health["max_model_len"] == 512
    values = {
        line.split()[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line and not line.startswith("#")
    }
    assert values["worker_generated_tokens_total"] >= 3
    assert values["worker_prompt_tokens_total"] >= 1
    assert values["worker_time_to_first_token_seconds_count"] >= 1
    assert "worker_running_requests" in values
    # The load signals the gateway's cache-aware routing reads, as it reads vLLM's.
    assert 0.0 <= values["worker_kv_cache_usage_perc"] <= 1.0
    from gateway.load_signals import parse_signals

    signals = parse_signals(metrics, 0.0)
    assert signals.running == 0.0 and signals.waiting == 0.0
    assert signals.cache_tokens is not None
    assert signals.cache_tokens >= health["kv_cache_tokens"]


async def test_models_says_the_demo_model_is_random(client: openai.AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    assert models[0].id == "demo"
    assert models[0].owned_by == "demo-random-weights"


async def test_api_key_is_required_on_v1_routes(worker: WorkerProcess) -> None:
    async with openai.AsyncOpenAI(base_url=worker.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            await bad.models.list()
    assert err.value.status_code == 401
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{worker.base_url}/completions", json={}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        async with http.get(f"{worker.origin}/health") as r:  # probes need no key
            assert r.status == 200


async def test_request_id_is_echoed_and_logged(worker: WorkerProcess) -> None:
    async with aiohttp.ClientSession(headers=worker.headers) as http:
        async with http.get(
            f"{worker.base_url}/models", headers={"X-Request-ID": "req-abc-123"}
        ) as r:
            assert r.headers["X-Request-ID"] == "req-abc-123"
        body = {"model": "demo", "prompt": "x", "max_tokens": 2, "stream": True}
        async with http.post(f"{worker.base_url}/completions", json=body) as r:
            assert len(r.headers["X-Request-ID"]) == 32
            await r.read()
    deadline = time.monotonic() + 5
    while "req-abc-123" not in worker.log_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    lines = [json.loads(x) for x in worker.log_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("request_id") == "req-abc-123"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/v1/models"


async def test_logs_carry_neither_prompts_nor_keys(
    worker: WorkerProcess, client: openai.AsyncOpenAI
) -> None:
    secret_prompt = "zebra-quartz-secret-prompt-9921"
    await client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": secret_prompt}], max_tokens=2
    )
    await client.completions.create(model="demo", prompt=secret_prompt, max_tokens=2)
    await asyncio.sleep(0.2)
    text = worker.log_text()
    assert '"path": "/v1/completions"' in text  # the requests were logged...
    assert secret_prompt not in text  # ...but not what they said
    assert API_KEY not in text


def test_health_is_503_while_loading_and_sigterm_exits_cleanly(
    tmp_path: Path, demo_cache: Path
) -> None:
    import urllib.error
    import urllib.request

    w = start_worker(tmp_path / "w.log", demo_cache, "--model", "demo")
    try:
        statuses = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{w.origin}/health", timeout=2) as resp:
                    statuses.add(resp.status)
                    break
            except urllib.error.HTTPError as exc:
                statuses.add(exc.code)
                assert json.load(exc)["status"] == "loading"
                assert exc.headers["Retry-After"]
            except OSError:
                pass
            time.sleep(0.01)
        wait_ready(w)
        assert 200 in statuses
    finally:
        # The manager's generation thread is not a daemon: without stop() this would hang,
        # and stop() raises TimeoutExpired after 30 s.
        code = w.stop(timeout=30)
    assert code == 0


def test_ctrl_c_then_sigterm_during_a_stream_still_exits(tmp_path: Path, demo_cache: Path) -> None:
    """Ctrl-C reaches every process of the group and `make run`'s script then sends SIGTERM.
    With a stream in flight, the second signal lands while aiohttp waits for it to finish and
    cuts the cleanup short; the worker must still stop its (non-daemon) generation thread."""
    import http.client
    import signal

    w = start_worker(tmp_path / "w.log", demo_cache, "--model", "demo")
    try:
        wait_ready(w)
        connection = http.client.HTTPConnection("127.0.0.1", w.port, timeout=30)
        body = json.dumps(
            {
                "model": "demo",
                "prompt": "hi",
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
            }
        )
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        response.read1(100)  # the stream is running
        w.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        w.proc.send_signal(signal.SIGTERM)
        w.proc.wait(timeout=45)
        connection.close()
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
            raise AssertionError("the worker hung after SIGINT + SIGTERM")
