"""proxy_bench's paced-stream client (issue #17) against the real fake backend: it counts every
stamped event, times the first one, and finds nothing wrong with a correct stream; a stream
that does not name the model asked for is an error, not a count."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from common import free_port, run_async  # noqa: E402
from proxy_bench import Proxy, paced_streams  # noqa: E402


@pytest.fixture
def backend_port() -> object:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "proxy_bench.py"), "--serve-backend", str(port)],
        stdout=subprocess.PIPE,
        cwd=BENCH.parent,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_paced_streams_are_counted_and_timed(backend_port: tuple[int, int]) -> None:
    port, pid = backend_port
    proxy = Proxy("direct", port, None, "real-model", "key", Path("."))
    started = time.monotonic()
    run = run_async(paced_streams(proxy, pid, 8, 5, 0.01, 0.4, 0.05, 5.0))
    assert not run.errors
    assert run.events > 0 and len(run.latency_ns) == run.events
    assert run.completed > 0 and run.ttfe_ns
    # Arrival minus the backend's stamp: a real interval on one clock, below the run's length.
    assert min(run.latency_ns) > 0 and max(run.latency_ns) < (time.monotonic() - started) * 1e9


def test_a_stream_for_another_model_is_an_error(backend_port: tuple[int, int]) -> None:
    port, pid = backend_port
    proxy = Proxy("direct", port, None, "real-model", "key", Path("."))
    proxy.model = "not-this-model"  # the backend echoes the request's: the check must see it
    original = proxy.request_body

    def body(stream: bool) -> bytes:
        return original(stream).replace(b'"not-this-model"', b'"real-model"')

    proxy.request_body = body  # type: ignore[method-assign]
    run = run_async(paced_streams(proxy, pid, 4, 3, 0.01, 0.3, 0.05, 5.0))
    assert run.completed == 0
    assert run.errors["events do not name the model asked for"] > 0


def test_a_stamped_stream_is_a_stream_openai_could_send(backend_port: tuple[int, int]) -> None:
    """The stamp is in each chunk's text: the chunks keep one id, one `created` and one
    fingerprint, as the spec says a stream's chunks do, and every event carries a stamp."""
    port, _ = backend_port

    async def fetch() -> bytes:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "real-model", "messages": [], "stream": True},
                headers={"X-Bench-Events": "5", "X-Bench-Interval": "0.001", "X-Bench-Stamp": "1"},
            ) as response,
        ):
            return await response.read()

    events = run_async(fetch()).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-2]]
    assert len(chunks) == 5
    assert len({(c["id"], c["created"], c["system_fingerprint"]) for c in chunks}) == 1
    texts = [c["choices"][0]["delta"]["content"] for c in chunks]
    assert all(re.fullmatch(r"sent \d{32}", text) for text in texts), texts
    assert len(set(texts)) == 5  # stamped as sent, not the placeholder
