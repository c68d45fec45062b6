"""CORS: off by default, allowOrigins from the file, ALLOW_ORIGINS from settings wins."""

from __future__ import annotations

from gateway.state import Settings
from tests.gateway.configs import config


async def test_cors_off_by_default(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    async with http.get(gw.url + "/v1/models", headers={"Origin": "http://ui.example"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_allowed_origin(make_gateway, backend, http) -> None:
    gw = await make_gateway({**config(backend), "allowOrigins": ["http://ui.example"]})
    async with http.options(
        gw.url + "/v1/chat/completions",
        headers={
            "Origin": "http://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    ) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "http://ui.example"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    async with http.post(
        gw.url + "/v1/chat/completions",
        json={"model": "llama", "stream": True},
        headers={"Origin": "http://ui.example"},
    ) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "http://ui.example"
        await response.read()
    async with http.get(
        gw.url + "/v1/models", headers={"Origin": "http://evil.example"}
    ) as response:
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_from_settings_overrides_config(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend), Settings(allow_origins=("*",)))
    async with http.get(
        gw.url + "/v1/models", headers={"Origin": "http://any.example"}
    ) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "*"
