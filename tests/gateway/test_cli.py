"""`python -m gateway` as users run it: check, env vars, SIGHUP, JSON logs without keys."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.gateway.test_failures import free_port

ROOT = Path(__file__).resolve().parents[2]
BACKEND_KEY = "sk-proj-backend-0123456789-secret"
ADMIN_KEY = "admin-0123456789-secret"
HEADER_SECRET = "hdr-0123456789-secret"


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_valid_file() -> None:
    result = run_check("--config", "config.example.json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("smollm2\t")
    assert "ok, 1 model(s)" in result.stdout


def test_check_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"endpoints": {"llama-8b": {"url": "nope", "apikey": "x"}}}')
    result = run_check("--config", str(path))
    assert result.returncode == 1
    assert f"{path}: endpoints.llama-8b.url" in result.stderr
    assert f"{path}: endpoints.llama-8b.apikey: unknown key" in result.stderr


def test_serve_refuses_an_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "endpoints: Field required" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_unknown_transport_relay_switch(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text('{"endpoints": {"m": {"url": "http://127.0.0.1:9/v1"}}}')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GATEWAY_TRANSPORT_RELAY": "maybe"},
    )
    assert result.returncode == 2
    assert "GATEWAY_TRANSPORT_RELAY must be on or off, not 'maybe'" in result.stderr
    assert "Traceback" not in result.stderr


async def wait_healthy(http: aiohttp.ClientSession, url: str, process: subprocess.Popen) -> None:
    for _ in range(200):
        assert process.poll() is None, process.stderr.read()
        try:
            async with http.get(url + "/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("gateway did not become healthy")


@pytest.mark.timeout(60)
async def test_served_process_env_config_sighup_and_logs(tmp_path, backend, http) -> None:
    config_path = tmp_path / "gateway.yaml"

    def write_config(*models: str) -> None:
        lines = ["endpoints:"]
        for model in models:
            lines += [
                f"  {model}:",
                f"    url: {backend.url}",
                "    apiKey: ${BACKEND_KEY}",
                f"    headers: {{X-Extra: {HEADER_SECRET}}}",
            ]
        config_path.write_text("\n".join(lines) + "\n")

    write_config("one")
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_CONFIG": str(config_path),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "BACKEND_KEY": BACKEND_KEY,
        "LOG_FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        await wait_healthy(http, url, process)

        # Requests down every path that could leak a key into a log line.
        async with http.post(
            url + "/v1/chat/completions",
            json={"model": "one", "messages": [{"role": "user", "content": "private prompt"}]},
            headers={"Authorization": "Bearer client-0123456789-secret"},
        ) as response:
            assert response.status == 200
        async with http.post(url + "/v1/chat/completions", json={"model": "none"}) as response:
            assert response.status == 404
        async with http.get(url + "/debug", headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        async with http.get(url + "/debug", headers=admin) as response:
            debug = await response.text()

        # SIGHUP reloads the edited file.
        write_config("one", "two")
        process.send_signal(signal.SIGHUP)
        for _ in range(100):
            async with http.get(url + "/v1/models") as response:
                models = [m["id"] for m in (await response.json())["data"]]
            if models == ["one", "two"]:
                break
            await asyncio.sleep(0.05)
        assert models == ["one", "two"]

        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=20)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    for secret in (BACKEND_KEY, ADMIN_KEY, HEADER_SECRET, "client-0123456789-secret"):
        assert secret not in stderr
        assert secret not in debug
    assert "private prompt" not in stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    access = [r for r in records if r.get("logger") == "gateway.access"]
    assert {r["status"] for r in access} >= {200, 404, 401}
    ok = next(r for r in access if r["status"] == 200)
    assert ok["model"] == "one" and ok["backend"] and ok["request_id"] and ok["duration_ms"] >= 0
    assert ok["prompt_tokens"] == 7 and ok["completion_tokens"] == 3
    assert any(
        r.get("event") == "config reloaded" and r.get("trigger") == "sighup" for r in records
    )


@pytest.mark.timeout(60)
async def test_sigterm_drains_in_flight_streams(tmp_path, backend, http) -> None:
    """SIGTERM: stop accepting, let the running stream finish, then exit 0."""
    from aiohttp import web

    from tests.gateway.backend import chunk, sse, start_sse

    async def slow(request: web.Request, received) -> web.StreamResponse:
        response = await start_sse(request)
        for _ in range(8):
            await response.write(sse(chunk("real", "tok")))
            await asyncio.sleep(0.25)
        await response.write(b"data: [DONE]\n\n")
        return response

    backend.handler = slow
    config_path = tmp_path / "gateway.json"
    config_path.write_text(json.dumps({"endpoints": {"m": {"url": backend.url}}}))
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env={**os.environ, "LOG_FORMAT": "json", "GATEWAY_DRAIN_TIMEOUT": "20"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(http, url, process)
        async with (
            aiohttp.ClientSession() as own,
            own.post(url + "/v1/chat/completions", json={"model": "m", "stream": True}) as response,
        ):
            await response.content.readuntil(b"\n\n")
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            # no new connections while draining
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(url + "/health"):
                    pass
            rest = await response.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert rest.count(b'"tok"') == 7
        _, stderr = await asyncio.to_thread(process.communicate, timeout=20)
        assert process.returncode == 0
        assert "gateway draining" in stderr and "gateway stopped" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_check_lists_every_backend_of_a_model(tmp_path: Path) -> None:
    path = tmp_path / "multi.yaml"
    path.write_text(
        """
endpoints:
  llama:
    strategy: priority
    apiKey: sk-shared-0123456789
    backends:
      - url: http://gpu-a:8000/v1
      - url: http://gpu-b:8000/v1
        actualModelName: llama-b
  ollama/*:
    url: http://ollama:11434/v1
"""
    )
    result = run_check("--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "llama\t'llama' (priority):"
    assert lines[1] == "  -> http://gpu-a:8000/v1 model=llama key=sk-...6789"
    assert lines[2] == "  -> http://gpu-b:8000/v1 model=llama-b key=sk-...6789"
    assert lines[3].startswith("ollama/*\t'ollama/*' -> http://ollama:11434/v1 model=(as sent")
    assert "sk-shared-0123456789" not in result.stdout


@pytest.mark.timeout(60)
async def test_empty_environment_variables_mean_unset(tmp_path, backend, http) -> None:
    """Compose's `${ALLOW_ORIGINS:-}` sets every variable it lists, empty when the operator
    set nothing: the file's allowOrigins must still apply, and empty port, host, workers,
    config and drain settings must take their defaults, not crash or mean "nothing"."""
    config_path = tmp_path / "gateway.json"
    config_path.write_text(
        json.dumps(
            {"endpoints": {"one": {"url": backend.url}}, "allowOrigins": ["http://ui.example"]}
        )
    )
    port = free_port()
    env = {**os.environ, "LOG_FORMAT": "json"}
    for name in (
        "ALLOW_ORIGINS",
        "GATEWAY_ADMIN_KEY",
        "GATEWAY_CONFIG",
        "GATEWAY_HOST",
        "GATEWAY_PORT",
        "GATEWAY_WORKERS",
        "GATEWAY_DRAIN_TIMEOUT",
    ):
        env[name] = ""
    command = [sys.executable, "-m", "gateway", "--config", str(config_path)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(http, url, process)
        async with http.get(
            url + "/v1/models", headers={"Origin": "http://ui.example"}
        ) as response:
            assert response.status == 200
            assert response.headers.get("Access-Control-Allow-Origin") == "http://ui.example"
        # An empty GATEWAY_ADMIN_KEY is no admin key, not a key of "".
        async with http.get(url + "/debug") as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.communicate, timeout=20)
