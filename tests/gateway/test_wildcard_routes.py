"""Wildcard routes (`ollama/*`): the backend's own models are listed and routed."""

from __future__ import annotations

import asyncio

import openai
import pytest
from aiohttp import web

from gateway.state import METRICS
from tests.gateway.backend import Received, ok_after


async def test_wildcard_route_lists_and_routes_backend_models(make_gateway, backend, http) -> None:
    async def ollama(request: web.Request, received: Received) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response(
                {
                    "object": "list",
                    "data": [
                        {"id": "llama3:8b", "object": "model"},
                        {"id": "qwen2.5", "object": "model"},
                    ],
                }
            )
        return await ok_after(0, received.json()["model"])

    backend.handler = ollama
    gw = await make_gateway(
        {
            "endpoints": {
                "fixed": {"url": backend.url},
                "ollama/*": {"url": backend.url, "displayName": "Ollama"},
            }
        }
    )
    for _ in range(50):
        ids = [m.id async for m in gw.openai().models.list()]
        if len(ids) > 1:
            break
        await asyncio.sleep(0.1)
    assert ids == ["fixed", "ollama/llama3:8b", "ollama/qwen2.5"]
    async with http.get(gw.url + "/v1/models") as response:
        names = [m["name"] for m in (await response.json())["data"]]
    assert names == ["fixed", "Ollama: llama3:8b", "Ollama: qwen2.5"]

    completion = await gw.openai().chat.completions.create(model="ollama/llama3:8b", messages=[])
    assert completion.model == "ollama/llama3:8b"
    assert backend.last.json()["model"] == "llama3:8b"
    model = await gw.openai().models.retrieve("ollama/qwen2.5")
    assert model.model_extra["name"] == "Ollama: qwen2.5"
    with pytest.raises(openai.NotFoundError):
        await gw.openai().chat.completions.create(model="ollama/", messages=[])
    text = gw.app[METRICS].render().decode()
    assert (
        'gateway_requests_total{model="ollama/*",route="chat.completions",status="200"} 1.0' in text
    )
