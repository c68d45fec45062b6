"""Retries: a failed attempt is retried elsewhere before the first byte, never after.

Refused, error status, stall, garbage, a stream or body cut short before anything reached the
client: another backend is asked. Retries are bounded, Retry-After is honoured, client errors
are not retried."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from aiohttp import web

from gateway.state import METRICS
from tests.gateway.backend import Received, answering, chunk, ok_after, sse, start_sse
from tests.gateway.configs import multi
from tests.gateway.test_failures import free_port


async def test_refused_backend_fails_over(make_gateway, backend) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = await make_gateway(multi(dead, backend.url, strategy="priority"))
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.model == "m"
    assert len(backend.received) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_error_statuses_fail_over_to_another_backend(
    make_gateway, make_backend, status
) -> None:
    bad, good = await make_backend(), await make_backend()
    bad.handler = answering(status)
    gw = await make_gateway(multi(bad.url, good.url, strategy="priority"))
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.model == "m"
    assert (len(bad.received), len(good.received)) == (1, 1)


async def test_stall_before_first_byte_fails_over(make_gateway, make_backend) -> None:
    slow, good = await make_backend(), await make_backend()

    async def stall(request: web.Request, received: Received) -> web.Response:
        return await ok_after(30)

    slow.handler = stall
    cfg = multi(slow.url, good.url, strategy="priority", timeouts={"firstByte": 0.5})
    gw = await make_gateway(cfg)
    stream = await gw.openai().chat.completions.create(model="m", messages=[], stream=True)
    assert [c.model async for c in stream] == ["m"] * 4
    assert len(good.received) == 1
    await asyncio.wait_for(slow.cancelled.wait(), 5)  # the stalled attempt was abandoned
    # ... by the first-byte timer (not by the stall ending: it would have answered JSON)
    text = gw.app[METRICS].render().decode()
    assert 'gateway_upstream_errors_total{kind="timeout_first_byte",model="m"} 1.0' in text


async def test_garbage_backend_fails_over(make_gateway, backend) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(
            multi(f"http://127.0.0.1:{port}/v1", backend.url, strategy="priority")
        )
        completion = await gw.openai().chat.completions.create(model="m", messages=[])
        assert completion.model == "m" and len(backend.received) == 1
    finally:
        server.close()


async def test_stream_dying_before_its_first_event_fails_over(
    make_gateway, make_backend, http
) -> None:
    """Headers alone are not a byte to the client: the stream is retried elsewhere."""
    broken, good = await make_backend(), await make_backend()

    async def headers_then_death(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(b": warming up\n")  # not even a whole event
        await asyncio.sleep(0.05)
        request.transport.close()
        return response

    broken.handler = headers_then_death
    gw = await make_gateway(multi(broken.url, good.url, strategy="priority"))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "m", "stream": True}
    ) as response:
        body = await response.read()
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    assert (len(broken.received), len(good.received)) == (1, 1)


async def test_json_body_cut_short_fails_over(make_gateway, make_backend) -> None:
    broken, good = await make_backend(), await make_backend()

    async def truncated(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": "500"}
        )
        await response.prepare(request)
        await response.write(b'{"model": "m", "choi')
        await asyncio.sleep(0.05)
        request.transport.close()
        return response

    broken.handler = truncated
    gw = await make_gateway(multi(broken.url, good.url, strategy="priority"))
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.choices[0].message.content == "Hello!"
    assert (len(broken.received), len(good.received)) == (1, 1)


async def test_no_retry_after_the_stream_started(make_gateway, make_backend, http) -> None:
    """Once bytes reached the client, a failure ends the stream with an error event; the
    other backend is never asked (the client would get the answer twice)."""
    first, second = await make_backend(), await make_backend()

    async def dies(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("m", "partial")))
        await asyncio.sleep(0.1)
        request.transport.close()
        return response

    first.handler = dies
    gw = await make_gateway(multi(first.url, second.url, strategy="priority"))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "m", "stream": True}
    ) as response:
        body = await response.read()
    events = body.split(b"\n\n")
    assert b"partial" in events[0]
    assert json.loads(events[1][6:])["error"]["code"] == "died"
    assert b"[DONE]" not in body
    assert second.received == []


async def test_retries_are_bounded(make_gateway, make_backend) -> None:
    backends = [await make_backend() for _ in range(4)]
    for b in backends:
        b.handler = answering(503)
    gw = await make_gateway(multi(*(b.url for b in backends), strategy="priority", retries=2))
    with pytest.raises(openai.InternalServerError) as caught:
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert caught.value.status_code == 503  # the last backend's own answer
    assert [len(b.received) for b in backends] == [1, 1, 1, 0]


async def test_retry_after_is_honoured_on_a_single_backend(make_gateway, backend) -> None:
    answers = iter([answering(429, {"Retry-After": "1"}), None])
    asked_at: list[float] = []

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        asked_at.append(asyncio.get_running_loop().time())
        nxt = next(answers)
        return await (nxt(request, received) if nxt else ok_after(0))

    backend.handler = handler
    gw = await make_gateway({"endpoints": {"m": {"url": backend.url}}})
    await gw.openai().chat.completions.create(model="m", messages=[])
    assert len(backend.received) == 2
    # The backend's own clock: it was not asked again before the second it asked for. A
    # lower bound a slow machine cannot break (asyncio wakes a timer at most 1 ns early).
    assert asked_at[1] - asked_at[0] >= 1.0 - 1e-6


async def test_long_retry_after_is_passed_to_the_client(make_gateway, backend) -> None:
    backend.handler = answering(429, {"Retry-After": "120"})
    gw = await make_gateway({"endpoints": {"m": {"url": backend.url}}})
    # Not waited out: waiting would trip this guard (and retrying would ask the backend twice).
    with pytest.raises(openai.RateLimitError) as caught:
        async with asyncio.timeout(60):
            await gw.openai().chat.completions.create(model="m", messages=[])
    assert caught.value.response.headers["Retry-After"] == "120"
    assert len(backend.received) == 1


async def test_client_errors_are_not_retried(make_gateway, make_backend) -> None:
    first, second = await make_backend(), await make_backend()
    first.handler = answering(400)
    gw = await make_gateway(multi(first.url, second.url, strategy="priority"))
    with pytest.raises(openai.BadRequestError):
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert (len(first.received), len(second.received)) == (1, 0)
