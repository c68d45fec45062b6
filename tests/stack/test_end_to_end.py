"""The stack without Docker: the real worker (demo model) behind the real gateway, used
through the openai SDK the way Open WebUI and scripts use it; and `make run`'s script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import openai
import pytest

from tests.stack.processes import ROOT, environment, free_port, stop, wait_healthy


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("stack")
    worker_port, gateway_port = free_port(), free_port()
    config = tmp / "gateway.json"
    config.write_text(
        json.dumps(
            {
                "endpoints": {
                    "local": {
                        "displayName": "Local demo (worker)",
                        "url": f"http://127.0.0.1:{worker_port}/v1",
                        "apiKey": "${WORKER_API_KEY}",
                        "actualModelName": "demo",
                    }
                }
            }
        )
    )
    key = "sk-worker-e2e-0123456789"
    env = environment(tmp, WORKER_API_KEY=key)
    logs = {name: (tmp / f"{name}.log").open("wb") for name in ("worker", "gateway")}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "--model",
            "demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(worker_port),
        ],
        cwd=ROOT,
        env=env,
        stdout=logs["worker"],
        stderr=subprocess.STDOUT,
    )
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(gateway_port),
        ],
        cwd=ROOT,
        env=env,
        stdout=logs["gateway"],
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{worker_port}/health", worker)
        wait_healthy(f"http://127.0.0.1:{gateway_port}/health", gateway)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="anything", max_retries=0
        )
        yield {
            "client": client,
            "worker_port": worker_port,
            "gateway_port": gateway_port,
            "tmp": tmp,
            "key": key,
        }
        client.close()
    finally:
        stop(gateway)
        stop(worker)
        for log in logs.values():
            log.close()


def test_models_listed_with_display_name(stack) -> None:
    models = stack["client"].models.list().data
    assert [(m.id, m.model_extra["name"]) for m in models] == [("local", "Local demo (worker)")]


def test_chat_through_the_gateway(stack) -> None:
    completion = stack["client"].chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert completion.model == "local"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8
    again = stack["client"].chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == completion.choices[0].message.content


def test_streaming_chat_through_the_gateway(stack) -> None:
    stream = stack["client"].chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {"local"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = stack["client"].chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert text == plain.choices[0].message.content


def test_embeddings_through_the_gateway(stack) -> None:
    result = stack["client"].embeddings.create(model="local", input=["one", "two"])
    assert result.model == "local"
    assert len(result.data) == 2 and len(result.data[0].embedding) > 0


def test_worker_key_injected_by_gateway(stack) -> None:
    """The worker requires its key; the client never has it, the gateway adds it."""
    direct = openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack['worker_port']}/v1", api_key="anything", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        direct.models.list()
    direct.close()
    gateway_log = (stack["tmp"] / "gateway.log").read_text()
    worker_log = (stack["tmp"] / "worker.log").read_text()
    assert stack["key"] not in gateway_log and stack["key"] not in worker_log


@pytest.mark.parametrize(
    ("variable", "port_key"), [("WORKER_PORT", "worker_port"), ("GATEWAY_PORT", "gateway_port")]
)
def test_compose_health_checks_pass_against_the_real_processes(stack, variable, port_key) -> None:
    """The exact probe the Dockerfile and compose run, against the live process."""
    env = {**os.environ, variable: str(stack[port_key])}
    probe = [sys.executable, "scripts/healthcheck.py", variable, "1", "/health"]
    assert subprocess.run(probe, cwd=ROOT, env=env, timeout=30).returncode == 0
    env[variable] = str(free_port())
    assert subprocess.run(probe, cwd=ROOT, env=env, timeout=30, capture_output=True).returncode == 1


def test_make_run_script_starts_both_and_stops_both_on_ctrl_c(tmp_path) -> None:
    worker_port, gateway_port = free_port(), free_port()
    config = tmp_path / "gateway.json"
    config.write_text(
        json.dumps({"endpoints": {"demo": {"url": f"http://127.0.0.1:{worker_port}/v1"}}})
    )
    env = environment(
        tmp_path,
        PY=sys.executable,
        MODEL="demo",  # the script's plumbing, on the model that starts in seconds
        WORKER_PORT=str(worker_port),
        GATEWAY_PORT=str(gateway_port),
        GATEWAY_CONFIG=str(config),
    )
    script = subprocess.Popen(
        ["bash", "scripts/run-stack.sh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = script.stdout.readline()
            assert line, "run-stack.sh ended early:\n" + "".join(lines)
            lines.append(line)
            if "Gateway ready" in line:
                break
        assert f"http://127.0.0.1:{gateway_port}/v1" in line
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="x", max_retries=0
        )
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.model == "demo"
        client.close()
        os.killpg(script.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        script.wait(60)
        children = subprocess.run(
            ["pgrep", "-f", f"--port {worker_port}|--port {gateway_port}"],
            capture_output=True,
            text=True,
        )
        assert children.stdout.strip() == "", "left running: " + children.stdout
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
