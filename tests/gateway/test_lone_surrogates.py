"""Lone surrogates: JSON may spell one (`\\ud800`), and Python's json reads it (and UTF-8
bytes that encode one), but no strict UTF-8 encoder writes it back. Where the gateway must
re-encode such a document, it escapes it instead of failing (a 500, or a stream cut)."""

from __future__ import annotations

import json

from aiohttp import web

from tests.gateway.backend import Received


def config(backend) -> dict:
    return {"endpoints": {"m": {"url": backend.url, "actualModelName": "real"}}}


async def test_a_request_spelling_a_lone_surrogate_is_forwarded(
    make_gateway, backend, http
) -> None:
    """`stream_options` given without usage: the body is re-encoded to ask for it."""
    gw = await make_gateway(config(backend))
    body = (
        b'{"model":"m","stream":true,"stream_options":{"include_usage":false},'
        b'"messages":[{"role":"user","content":"\\ud800 x"}]}'
    )
    async with http.post(
        gw.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 200, await r.text()
        await r.read()
    sent = json.loads(backend.last.body)
    assert sent["messages"][0]["content"] == "\ud800 x"
    assert sent["model"] == "real" and sent["stream_options"] == {"include_usage": True}


async def test_a_chunk_carrying_an_encoded_lone_surrogate_is_relayed(
    make_gateway, backend, http
) -> None:
    """A chunk on two `data:` lines (joined, parsed, re-encoded), its text a surrogate in
    UTF-8 bytes: sent with the public id, the surrogate escaped."""

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(
            b'data: {"model":"real",\ndata: "choices":[{"index":0,'
            b'"delta":{"content":"\xed\xa0\x80"}}]}\n\ndata: [DONE]\n\n'
        )
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions",
        json={"model": "m", "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        body = await r.read()
    first, done = body.split(b"\n\n")[:2]
    chunk = json.loads(first[6:].decode())  # strict UTF-8: the surrogate is escaped
    assert chunk["model"] == "m" and chunk["choices"][0]["delta"]["content"] == "\ud800"
    assert done == b"data: [DONE]"
