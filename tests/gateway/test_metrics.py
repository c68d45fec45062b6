"""/metrics: requests, tokens, latency, in-flight, reloads and upstream errors by kind."""

from __future__ import annotations

import openai
import pytest
from aiohttp import web

from gateway.state import METRICS
from tests.gateway.backend import Received
from tests.gateway.configs import config


async def test_metrics(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    client = gw.openai()
    await client.chat.completions.create(model="llama", messages=[])
    stream = await client.chat.completions.create(
        model="llama", messages=[], stream=True, stream_options={"include_usage": True}
    )
    [c async for c in stream]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="not-configured", messages=[])
    gw.config_path.write_text("{broken")
    async with http.post(gw.url + "/reload"):
        pass
    async with http.get(gw.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert 'gateway_requests_total{model="llama",route="chat.completions",status="200"} 2.0' in text
    assert 'gateway_requests_total{model="other",route="chat.completions",status="404"} 1.0' in text
    assert 'gateway_tokens_total{model="llama",type="prompt"} 14.0' in text
    assert 'gateway_tokens_total{model="llama",type="completion"} 6.0' in text
    assert 'gateway_time_to_first_token_seconds_count{model="llama"} 1.0' in text
    assert (
        'gateway_request_duration_seconds_count{model="llama",route="chat.completions"} 2.0' in text
    )
    assert 'gateway_in_flight_requests{model="llama"} 0.0' in text
    assert 'gateway_config_reloads_total{outcome="error",trigger="api"} 1.0' in text
    assert "not-configured" not in text


async def test_metrics_count_upstream_errors_by_kind(make_gateway, backend, http) -> None:
    async def fail(request: web.Request, received: Received) -> web.Response:
        return web.json_response({"error": {"message": "boom"}}, status=500)

    backend.handler = fail
    gw = await make_gateway(config(backend))
    with pytest.raises(openai.InternalServerError):
        await gw.openai().chat.completions.create(model="llama", messages=[])
    async with http.post(gw.url + "/v1/chat/completions", json={"model": "nope"}):
        pass
    text = gw.app[METRICS].render().decode()
    # the first attempt and both retries
    assert 'gateway_upstream_errors_total{kind="http_500",model="llama"} 3.0' in text
