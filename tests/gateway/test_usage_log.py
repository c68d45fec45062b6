"""The usage log never fails a request nor blocks the event loop: a thread writes it, and a
disk that cannot take the lines costs those lines (counted, logged once), never a request."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from gateway.state import METRICS, USAGE_LOG


def config(backend, path: str) -> dict:
    return {"endpoints": {"m": {"url": backend.url}}, "usageLog": path}


def errors(gw, reason: str = "write") -> float:
    for line in gw.app[METRICS].render().decode().splitlines():
        if line.startswith(f'gateway_usage_log_errors_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_a_full_disk_fails_no_request_and_is_logged_once(
    make_gateway, backend, capsys
) -> None:
    gw = await make_gateway(config(backend, "/dev/full"))
    client = gw.openai()
    for _ in range(5):
        answer = await client.chat.completions.create(model="m", messages=[])
        assert answer.choices[0].message.content == "Hello!"
    await asyncio.to_thread(gw.app[USAGE_LOG].wait_written)
    assert errors(gw) == 5  # every line lost is counted
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    failures = [r for r in logged if r.get("event") == "cannot write the usage log"]
    assert len(failures) == 1  # once per outage, not once per request
    assert failures[0]["level"] == "error" and "No space left" in failures[0]["error"]


@pytest.mark.timeout(30)
async def test_a_file_that_blocks_blocks_no_request(make_gateway, backend, tmp_path) -> None:
    """A FIFO nobody reads yet: opening it blocks, as a hung network disk would. Requests are
    answered meanwhile, and once it can be written every line arrives."""
    fifo = tmp_path / "usage.fifo"
    os.mkfifo(fifo)
    gw = await make_gateway(config(backend, str(fifo)))
    client = gw.openai()
    for _ in range(3):
        answer = await client.chat.completions.create(model="m", messages=[])
        assert answer.choices[0].message.content == "Hello!"
    received = await asyncio.to_thread(_read_lines, fifo, 3)
    lines = [json.loads(line) for line in received.splitlines()]
    assert [(e["model"], e["status"]) for e in lines] == [("m", 200)] * 3
    assert errors(gw) == 0


def _read_lines(fifo: Path, count: int) -> bytes:
    """Open the FIFO (which lets the writer's open through) and read `count` lines."""
    received = b""
    with open(fifo, "rb", buffering=0) as reader:
        while received.count(b"\n") < count:
            chunk = reader.read(65536)
            if not chunk:
                break
            received += chunk
    return received
