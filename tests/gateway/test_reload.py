"""POST /reload: a good file swaps the config, a broken one changes nothing and says why.

A stream under way finishes on the config it started with."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from tests.gateway.backend import Received, chunk, sse, start_sse
from tests.gateway.configs import config


async def test_reload_reports_added_removed_changed(make_gateway, make_backend, http) -> None:
    a, b = await make_backend(), await make_backend()
    gw = await make_gateway(
        {"endpoints": {"one": {"url": a.url}, "two": {"url": a.url}, "three": {"url": a.url}}}
    )
    gw.config_path.write_text(
        json.dumps(
            {"endpoints": {"one": {"url": a.url}, "two": {"url": b.url}, "four": {"url": b.url}}}
        )
    )
    async with http.post(gw.url + "/reload") as response:
        assert response.status == 200
        outcome = await response.json()
    assert outcome["status"] == "reloaded"
    assert (outcome["added"], outcome["removed"], outcome["changed"]) == (
        ["four"],
        ["three"],
        ["two"],
    )
    assert outcome["version"] == 2
    models = [m.id async for m in gw.openai().models.list()]
    assert models == ["one", "two", "four"]
    await gw.openai().chat.completions.create(model="two", messages=[])
    assert len(b.received) == 1
    async with http.get(gw.url + "/debug") as response:
        debug = await response.json()
    assert debug["version"] == 2
    assert debug["lastReload"]["ok"] is True


@pytest.mark.parametrize(
    "broken",
    [
        "{not json",
        '{"endpoints": {"llama": {"url": "ftp://nope"}}}',
        '{"endpoints": {"llama": {"url": "http://x/v1", "apikey": "typo"}}}',
        '{"endpoints": {"llama": {"url": "${UNSET_VARIABLE_FOR_TEST}"}}}',
    ],
)
async def test_broken_reload_keeps_old_config(make_gateway, backend, http, broken) -> None:
    gw = await make_gateway(config(backend))
    gw.config_path.write_text(broken)
    async with http.post(gw.url + "/reload") as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["code"] == "invalid_config"
    assert str(gw.config_path) in error["message"]
    completion = await gw.openai().chat.completions.create(model="llama", messages=[])
    assert completion.model == "llama"
    async with http.get(gw.url + "/debug") as response:
        debug = await response.json()
    assert debug["version"] == 1
    assert debug["lastReload"]["ok"] is False
    assert debug["lastReload"]["errors"]


async def test_reload_error_names_the_path_inside_the_file(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    gw.config_path.write_text('{"endpoints": {"llama-8b": {"url": 42}}}')
    async with http.post(gw.url + "/reload") as response:
        message = (await response.json())["error"]["message"]
    assert "endpoints.llama-8b.url" in message


async def test_in_flight_stream_finishes_on_its_config(make_gateway, make_backend, http) -> None:
    old, new = await make_backend(), await make_backend()
    release = asyncio.Event()

    async def slow(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("real", "before")))
        await asyncio.wait_for(release.wait(), 10)
        await response.write(sse(chunk("real", "after")))
        await response.write(b"data: [DONE]\n\n")
        return response

    old.handler = slow
    gw = await make_gateway(config(old))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        await response.content.readuntil(b"\n\n")
        gw.config_path.write_text(json.dumps({"endpoints": {"other": {"url": new.url}}}))
        async with http.post(gw.url + "/reload") as reload:
            assert (await reload.json())["removed"] == ["llama"]
        release.set()
        rest = await response.read()
    after = json.loads(rest.split(b"\n\n")[0][6:])
    assert after["choices"][0]["delta"]["content"] == "after" and after["model"] == "llama"
    assert rest.endswith(b"data: [DONE]\n\n")
    assert new.received == []
