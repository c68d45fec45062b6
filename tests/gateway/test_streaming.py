"""Streams: relayed event by event as they arrive, model rewritten in each, never buffered."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from tests.gateway.backend import Received, chunk, sse, start_sse
from tests.gateway.waiting import settled


def config(backend):
    return {
        "endpoints": {
            "llama": {
                "url": backend.url,
                "apiKey": "sk-0000-backend-key",
                "actualModelName": "real",
            }
        }
    }


async def read_events(response, limit: int = 1000) -> list[bytes]:
    """Whole SSE events as the client sees them (test-side framing on blank lines)."""
    buffer = b""
    events = []
    async for data in response.content.iter_any():
        buffer += data
        while b"\n\n" in buffer and len(events) < limit:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append(event)
    return events


async def test_stream_rewrites_model_in_every_event(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    stream = await gw.openai().chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert backend.last.json()["model"] == "real"
    assert backend.last.json()["stream"] is True
    assert len(chunks) == 5
    assert {c.model for c in chunks} == {"llama"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    assert chunks[-1].usage.total_tokens == 10


async def test_stream_headers(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        assert response.headers["Cache-Control"] == "no-cache"
        assert "Content-Encoding" not in response.headers
        assert response.headers["x-gateway-upstream-model"] == "real"
        events = await read_events(response)
    assert events[-1] == b"data: [DONE]"


async def test_first_event_reaches_client_before_backend_sends_second(
    make_gateway, backend, http
) -> None:
    """The backend holds its second event until the client has the first: a gateway that
    buffered would never deliver it, and the test would time out."""
    client_has_first = asyncio.Event()

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("real", "first")))
        await asyncio.wait_for(client_has_first.wait(), 10)
        await response.write(sse(chunk("real", "second")))
        await response.write(b"data: [DONE]\n\n")
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "first"
        assert json.loads(first[6:])["model"] == "llama"
        client_has_first.set()
        rest = await read_events(response)
    assert b'"second"' in rest[0]
    assert rest[-1] == b"data: [DONE]"


@pytest.mark.parametrize(
    "end, cut", [(b"\n\n", 1), (b"\r\n\r\n", 1), (b"\r\n\r\n", 2), (b"\r\n\r\n", 3)]
)
async def test_first_event_whose_blank_line_straddles_two_reads_is_sent_at_once(
    make_gateway, backend, http, end: bytes, cut: int
) -> None:
    """The first event's end arrives split over two writes, then the backend waits for the
    client to have it: a gateway that missed the end across reads would wait for more."""
    client_has_first = asyncio.Event()
    first = b"data: " + json.dumps(chunk("real", "first")).encode() + end

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(first[: len(first) - len(end) + cut])
        await asyncio.sleep(0.01)  # two reads, not one (not a wait for a result)
        await response.write(first[len(first) - len(end) + cut :])
        await asyncio.wait_for(client_has_first.wait(), 10)
        await response.write(b"data: [DONE]" + end)
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        # A rewritten event leaves in LF framing, whatever framing it came in.
        got = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert json.loads(got[6:])["model"] == "llama"
        client_has_first.set()
        rest = await response.read()
    assert rest == b"data: [DONE]" + end


async def test_events_split_across_chunks_comments_and_crlf(make_gateway, backend, http) -> None:
    """Events cut at every byte, CRLF framing, comment lines, `event:`/`id:` fields and
    multi-line data all arrive whole, with the model rewritten."""
    payload = (
        b": keep-alive comment\n\n"
        + b"id: 1\r\nevent: message\r\ndata: "
        + json.dumps(chunk("real", "one")).encode()
        + b"\r\n\r\n"
        + b'data: {"model": "real",\ndata:  "choices": []}\n\n'
        + b"data: not json at all\n\n"
        + b"data: [DONE]\n\n"
    )

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        for i in range(len(payload)):
            await response.write(payload[i : i + 1])
            if i % 7 == 0:
                await asyncio.sleep(0)
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        body = await response.read()
    events = body.replace(b"\r\n", b"\n").split(b"\n\n")
    assert events[0] == b": keep-alive comment"
    lines = events[1].split(b"\n")
    assert lines[:2] == [b"id: 1", b"event: message"]
    assert json.loads(lines[2][6:])["model"] == "llama"
    assert json.loads(events[2][6:]) == {"model": "llama", "choices": []}
    assert events[3] == b"data: not json at all"
    assert events[4] == b"data: [DONE]"


async def test_event_of_several_megabytes_passes_intact(make_gateway, backend, http) -> None:
    big = "x" * (8 * 1024 * 1024)

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("real", big)))
        await response.write(b"data: [DONE]\n\n")
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        events = await read_events(response)
    event = json.loads(events[0][6:])
    assert event["model"] == "llama"
    assert event["choices"][0]["delta"]["content"] == big
    assert events[1] == b"data: [DONE]"


async def test_slow_client_slows_backend_reads(make_gateway, backend, http) -> None:
    """Backpressure: while the client reads nothing, the backend cannot write much more than
    the socket buffers hold; memory per stream stays bounded."""
    written = 0
    event = sse(chunk("real", "y" * 16_000))

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        nonlocal written
        response = await start_sse(request)
        for _ in range(4000):  # 64 MB if nothing pushed back
            await response.write(event)
            written += len(event)
        await response.write(b"data: [DONE]\n\n")
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        await response.content.readuntil(b"\n\n")
        # The client stops reading: the backend's writes stop too, long before 64 MB (without
        # backpressure they would only stop at the end, all 64 MB in the gateway's memory).
        stalled_at = await settled(lambda: written)
        assert stalled_at < 32 * 1024 * 1024, stalled_at
        body = await response.read()  # then drains everything
    assert body.endswith(b"data: [DONE]\n\n")
    assert written == 4000 * len(event)


async def test_completions_stream(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    stream = await gw.openai().completions.create(model="llama", prompt="Hello", stream=True)
    chunks = [c async for c in stream]
    assert [c.model for c in chunks] == ["llama"]
    assert chunks[0].choices[0].text == " world"
