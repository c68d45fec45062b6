"""/health says the process is up; /ready says which models have a healthy backend."""

from __future__ import annotations

import openai
import pytest

from gateway.state import DRAINING
from tests.gateway.configs import config
from tests.gateway.test_failures import free_port


async def test_health(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    async with http.get(gw.url + "/health") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_ready_reports_models_without_a_healthy_backend(make_gateway, backend, http) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = await make_gateway(
        {
            "endpoints": {"up": {"url": backend.url}, "down": {"url": dead}},
            "retries": 0,
            "circuitBreaker": {"failures": 1, "cooldown": 30},
        }
    )
    async with http.get(gw.url + "/ready") as response:
        assert response.status == 200
    with pytest.raises(openai.APIStatusError):
        await gw.openai().chat.completions.create(model="down", messages=[])
    async with http.get(gw.url + "/ready") as response:
        assert response.status == 503
        body = await response.json()
    assert body["unavailable"] == ["down"]
    assert list(body["models"]["up"].values()) == ["healthy"]
    # while it rests, requests fail fast with a 503 that says when to come back
    with pytest.raises(openai.InternalServerError) as caught:
        await gw.openai().chat.completions.create(model="down", messages=[])
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "no_healthy_backend"
    assert int(caught.value.response.headers["Retry-After"]) > 1
    gw.app[DRAINING].set()
    async with http.get(gw.url + "/ready") as response:
        assert response.status == 503 and (await response.json())["status"] == "draining"
