"""Fixtures: fake backends and the real gateway, each a real server on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.app import build_app
from gateway.server import bound_port, start
from gateway.state import Settings
from tests.gateway.backend import FakeBackend
from tests.gateway.redis_server import RedisServer


@dataclass
class Gateway:
    app: web.Application
    runner: web.AppRunner
    config_path: Path
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def port(self) -> int:
        return bound_port(self.runner)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, api_key: str = "client-key", **kwargs: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs
        )
        self.clients.append(client)
        return client


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    server = await FakeBackend().start()
    yield server
    await server.stop()


@pytest.fixture
async def make_backend() -> AsyncIterator[Callable[[], Any]]:
    started: list[FakeBackend] = []

    async def make() -> FakeBackend:
        server = await FakeBackend().start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


def endpoint(backend: FakeBackend, **extra: Any) -> dict[str, Any]:
    return {"url": backend.url, **extra}


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    gateways: list[Gateway] = []

    async def make(
        config: dict[str, Any] | str,
        settings: Settings | None = None,
        filename: str = "gateway.json",
        watch: bool = False,
    ) -> Gateway:
        path = tmp_path / filename
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        app = build_app(path, settings, watch=watch)
        runner = await start(app, "127.0.0.1", 0)
        gateways.append(Gateway(app, runner, path))
        return gateways[-1]

    yield make
    for gateway in gateways:
        for client in gateway.clients:
            await client.close()
        await gateway.runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
