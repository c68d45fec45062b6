"""Any other path under /v1 goes to the backend that owns the body's model, rewritten the same."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from aiohttp import web

from tests.gateway.backend import Received


def config(backend, other):
    return {
        "endpoints": {
            "whisper": {
                "url": backend.url,
                "actualModelName": "whisper-large-v3",
                "apiKey": "sk-aaaa-1111-key",
            },
            "guard": {"url": other.url, "actualModelName": "llama-guard"},
        }
    }


async def test_json_passthrough_routes_by_model(make_gateway, make_backend) -> None:
    first, second = await make_backend(), await make_backend()

    async def moderation(request: web.Request, received: Received) -> web.Response:
        return web.json_response({"id": "modr-1", "model": received.json()["model"], "results": []})

    second.handler = moderation
    gw = await make_gateway(config(first, second))
    result = await gw.openai().moderations.create(model="guard", input="hello")
    assert result.model == "guard"
    assert second.last.path == "/v1/moderations"
    assert second.last.json() == {"model": "llama-guard", "input": "hello"}
    assert first.received == []


async def test_multipart_model_field_rewritten_file_untouched(make_gateway, make_backend) -> None:
    first, second = await make_backend(), await make_backend()
    audio = bytes(range(256)) * 64

    async def transcription(request: web.Request, received: Received) -> web.Response:
        return web.json_response({"text": "hello"})

    first.handler = transcription
    gw = await make_gateway(config(first, second))
    result = await gw.openai().audio.transcriptions.create(
        model="whisper", file=("clip.wav", audio, "audio/wav")
    )
    assert result.text == "hello"
    received = first.last
    assert received.path == "/v1/audio/transcriptions"
    assert received.headers["Authorization"] == "Bearer sk-aaaa-1111-key"
    assert b'name="model"\r\n\r\nwhisper-large-v3\r\n' in received.body
    assert audio in received.body
    assert b"whisper\r\n" not in received.body.replace(b"whisper-large-v3", b"")


async def test_binary_response_streams_through_unchanged(make_gateway, make_backend) -> None:
    first, second = await make_backend(), await make_backend()
    speech = bytes(range(256)) * 1000

    async def tts(request: web.Request, received: Received) -> web.Response:
        return web.Response(body=speech, content_type="audio/mpeg")

    second.handler = tts
    gw = await make_gateway(config(first, second))
    response = await gw.openai().audio.speech.create(model="guard", voice="alloy", input="hi")
    assert response.content == speech
    assert second.last.path == "/v1/audio/speech"
    assert second.last.json()["model"] == "llama-guard"


async def test_responses_api_stream_rewrites_nested_model(make_gateway, make_backend, http) -> None:
    first, second = await make_backend(), await make_backend()

    async def responses(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = {"type": "response.created", "response": {"id": "r1", "model": "llama-guard"}}
        await response.write(
            b"event: response.created\ndata: " + json.dumps(event).encode() + b"\n\n"
        )
        return response

    second.handler = responses
    gw = await make_gateway(config(first, second))
    async with http.post(
        gw.url + "/v1/responses", json={"model": "guard", "input": "hi", "stream": True}
    ) as response:
        body = await response.read()
    event_line, data_line = body.strip().split(b"\n")
    assert event_line == b"event: response.created"
    assert json.loads(data_line[6:])["response"]["model"] == "guard"


async def test_passthrough_without_v1_prefix(make_gateway, make_backend, http) -> None:
    first, second = await make_backend(), await make_backend()
    gw = await make_gateway(config(first, second))
    async with http.post(gw.url + "/rerank", json={"model": "guard", "query": "q"}) as response:
        assert response.status == 200
    assert second.last.path == "/v1/rerank"


async def test_passthrough_without_model_is_400(make_gateway, make_backend) -> None:
    first, second = await make_backend(), await make_backend()
    gw = await make_gateway(config(first, second))
    with pytest.raises(openai.BadRequestError) as caught:
        await gw.openai().post("/images/generations", body={"prompt": "a cat"}, cast_to=object)
    assert caught.value.body["code"] == "missing_model"
    assert first.received == second.received == []


@pytest.mark.parametrize(
    "path",
    ["/v1/../admin", "/v1/a/%2e%2e/b", "/v1/%2E%2E/secret", "/v1/a//b", "/v1/a/%2fetc", "/v1/./x"],
)
async def test_paths_cannot_escape_the_backend_base(make_gateway, make_backend, path) -> None:
    first, second = await make_backend(), await make_backend()
    gw = await make_gateway(config(first, second))
    # A raw socket, so no client library normalises the path on the way.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    body = b'{"model": "guard"}'
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status = int(answer.split(b" ")[1])
    assert status in (400, 404), answer[:200]
    assert second.received == [] and first.received == []
