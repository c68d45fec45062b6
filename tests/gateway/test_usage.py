"""Token counts for streams whose client did not ask for usage: the gateway asks the backend
(stream_options.include_usage), counts the tokens, and the client never sees the extra
chunk. Backends that refuse stream_options are remembered and asked no more."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.state import METRICS
from tests.gateway.backend import Received, default_handler


def config(backend) -> dict:
    return {"endpoints": {"m": {"url": backend.url, "actualModelName": "real"}}}


async def test_stream_usage_is_counted_and_not_shown(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    stream = await gw.openai().chat.completions.create(model="m", messages=[], stream=True)
    chunks = [c async for c in stream]
    sent = backend.last.json()
    assert sent["stream_options"] == {"include_usage": True}
    assert len(chunks) == 4  # the three deltas and the finish; not the usage chunk
    assert all(c.usage is None and c.choices for c in chunks)
    text = gw.app[METRICS].render().decode()
    assert 'gateway_tokens_total{model="m",type="completion"} 3.0' in text


async def test_usage_the_client_asked_for_passes_through(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    stream = await gw.openai().chat.completions.create(
        model="m", messages=[], stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage.total_tokens == 10 and chunks[-1].choices == []


async def test_usage_inside_a_chunk_with_choices_is_removed_not_the_chunk(
    make_gateway, backend, http
) -> None:
    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = {
            "model": "real",
            "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend))
    async with http.post(gw.url + "/v1/chat/completions", json={"model": "m", "stream": True}) as r:
        body = await r.read()
    first = json.loads(body.split(b"\n\n")[0][6:])
    assert first["choices"][0]["delta"]["content"] == "hi" and "usage" not in first


async def test_backend_refusing_stream_options_is_remembered(make_gateway, backend) -> None:
    async def picky(request: web.Request, received: Received) -> web.StreamResponse:
        if "stream_options" in received.json():
            return web.json_response(
                {"error": {"message": "unknown field stream_options"}}, status=400
            )
        return await default_handler(request, received)

    backend.handler = picky
    gw = await make_gateway(config(backend))
    for _ in range(2):
        stream = await gw.openai().chat.completions.create(model="m", messages=[], stream=True)
        assert len([c async for c in stream]) == 4
    asked = ["stream_options" in r.json() for r in backend.received]
    assert asked == [True, False, False]  # refused once, then never asked again


async def test_non_stream_and_other_routes_are_untouched(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    await gw.openai().chat.completions.create(model="m", messages=[])
    assert "stream_options" not in backend.last.json()
    await gw.openai().embeddings.create(model="m", input="x")
    assert "stream_options" not in backend.last.json()


def _vllm_like(backend) -> None:
    """Streams as vLLM does: compact JSON; with include_usage, `"usage":null` on every chunk
    and a last chunk with the counts and no choices; without it, no `usage` key at all."""

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        payload = received.json()
        with_usage = (payload.get("stream_options") or {}).get("include_usage") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, finish in [
            ({"role": "assistant", "content": ""}, None),
            ({"content": "Hi"}, None),
            ({}, "stop"),
        ]:
            event: dict = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": payload["model"],
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if with_usage:
                event["usage"] = None
            await response.write(
                b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            )
        if with_usage:
            last = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": payload["model"],
                "choices": [],
                "usage": {"prompt_tokens": 5, "total_tokens": 7, "completion_tokens": 2},
            }
            await response.write(
                b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\n"
            )
        await response.write(b"data: [DONE]\n\n")
        return response

    backend.handler = handler


async def test_a_vllm_stream_is_what_the_client_would_get_without_the_gateway(
    make_gateway, backend, http
) -> None:
    """The usage the gateway asked for leaves no trace: not the last chunk, and not the
    `"usage":null` vLLM adds to every chunk once asked. Byte for byte, apart from `model`."""
    _vllm_like(backend)
    gw = await make_gateway(config(backend))
    request = {"model": "real", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with http.post(backend.url + "/chat/completions", json=request) as r:
        direct = await r.read()
    async with http.post(gw.url + "/v1/chat/completions", json={**request, "model": "m"}) as r:
        through = await r.read()
    assert backend.last.json()["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in direct
    assert through == direct.replace(b'"model":"real"', b'"model":"m"')
    text = gw.app[METRICS].render().decode()
    assert 'gateway_tokens_total{model="m",type="completion"} 2.0' in text


async def test_a_spaced_null_usage_is_cut_too(make_gateway, backend, http) -> None:
    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(
            b'data: {"usage": null, "model": "m", "choices": [{"index": 0, "delta": {}}]}\n\n'
            b'data: {"model": "m", "choices": [{"index": 0, "delta": {}}], "usage": null}\n\n'
            b"data: [DONE]\n\n"
        )
        return response

    backend.handler = handler
    gw = await make_gateway({"endpoints": {"m": {"url": backend.url}}})
    async with http.post(gw.url + "/v1/chat/completions", json={"model": "m", "stream": True}) as r:
        through = await r.read()
    assert through == (
        b'data: {"model": "m", "choices": [{"index": 0, "delta": {}}]}\n\n'
        b'data: {"model": "m", "choices": [{"index": 0, "delta": {}}]}\n\n'
        b"data: [DONE]\n\n"
    )
