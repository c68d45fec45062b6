"""maxConcurrent: requests over a backend's limit wait up to queueTimeout, then get 503."""

from __future__ import annotations

import asyncio

import openai
from aiohttp import web

from tests.gateway.backend import Received, ok_after


async def test_max_concurrent_waits_then_503(make_gateway, backend) -> None:
    async def slow(request: web.Request, received: Received) -> web.Response:
        return await ok_after(1.5)

    backend.handler = slow
    cfg = {
        "endpoints": {"m": {"backends": [{"url": backend.url, "maxConcurrent": 2}]}},
        "queueTimeout": 0.3,
    }
    gw = await make_gateway(cfg)
    client = gw.openai()
    results = await asyncio.gather(
        *(client.chat.completions.create(model="m", messages=[]) for _ in range(3)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], openai.InternalServerError)
    assert errors[0].status_code == 503
    assert errors[0].body["code"] == "backend_busy"
    assert errors[0].response.headers["Retry-After"] == "1"
    assert len(backend.received) == 2


async def test_max_concurrent_queues_within_the_wait(make_gateway, backend) -> None:
    async def slow(request: web.Request, received: Received) -> web.Response:
        return await ok_after(0.3)

    backend.handler = slow
    cfg = {
        "endpoints": {"m": {"backends": [{"url": backend.url, "maxConcurrent": 1}]}},
        "queueTimeout": 5,
    }
    gw = await make_gateway(cfg)
    client = gw.openai()
    results = await asyncio.gather(
        *(client.chat.completions.create(model="m", messages=[]) for _ in range(4))
    )
    assert len(results) == 4 and len(backend.received) == 4
