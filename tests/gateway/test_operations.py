"""Operating the gateway: /health, /debug (keys masked), /reload, admin key, /metrics, CORS."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from aiohttp import web

from gateway.state import METRICS, STORE, Settings
from tests.gateway.backend import Received, chunk, sse, start_sse

KEY = "sk-live-0123456789abcdef"


def config(backend, **extra):
    return {
        "endpoints": {
            "llama": {
                "url": backend.url,
                "displayName": "Llama",
                "apiKey": KEY,
                "actualModelName": "real",
                "headers": {"X-Backend-Token": "tok-9876543210-secret"},
                **extra,
            }
        }
    }


async def test_health(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    async with http.get(gw.url + "/health") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_debug_masks_every_secret(make_gateway, backend, http) -> None:
    cfg = config(backend)
    cfg["endpoints"]["other"] = {
        "url": "http://user:hunter2-password@127.0.0.1:9/v1",
        "apiKey": "short",
    }
    gw = await make_gateway(cfg)
    async with http.get(gw.url + "/debug") as response:
        assert response.status == 200
        text = await response.text()
    for secret in (KEY, "tok-9876543210-secret", "hunter2-password", '"short"'):
        assert secret not in text
    debug = json.loads(text)
    (llama,) = debug["config"]["endpoints"]["llama"]["backends"]
    assert llama["apiKey"] == "sk-...cdef"
    assert llama["actualModelName"] == "real"
    assert llama["live"]["state"] == "healthy"
    assert debug["config"]["endpoints"]["other"]["backends"][0]["apiKey"] == "***"
    assert debug["version"] == 1
    assert debug["source"] == str(gw.config_path)
    assert debug["loadedAt"] > 0
    assert debug["lastReload"] is None


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


async def test_file_change_reloads(make_gateway, make_backend) -> None:
    a = await make_backend()
    gw = await make_gateway({"endpoints": {"one": {"url": a.url}}}, watch=True)
    await asyncio.sleep(0.3)  # let the watcher start
    gw.config_path.write_text(
        json.dumps({"endpoints": {"one": {"url": a.url}, "two": {"url": a.url}}})
    )
    for _ in range(100):
        models = [m.id async for m in gw.openai().models.list()]
        if models == ["one", "two"]:
            break
        await asyncio.sleep(0.1)
    assert models == ["one", "two"]
    # a broken edit is rejected and the last good config keeps serving
    gw.config_path.write_text('{"endpoints": ')
    store = gw.app[STORE]
    for _ in range(100):
        if store.last_reload is not None and not store.last_reload.ok:
            break
        await asyncio.sleep(0.1)
    assert store.last_reload.trigger == "file" and not store.last_reload.ok
    assert [m.id async for m in gw.openai().models.list()] == ["one", "two"]


async def test_admin_key_guards_debug_and_reload(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend), Settings(admin_key="admin-key-for-tests-123"))
    for method, path in (("GET", "/debug"), ("POST", "/reload")):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "admin-key-for-tests-123"},
        ):
            async with http.request(method, gw.url + path, headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]["type"] == "authentication_error"
        good = {"Authorization": "Bearer admin-key-for-tests-123"}
        async with http.request(method, gw.url + path, headers=good) as response:
            assert response.status == 200
    # the public API and health stay open
    async with http.get(gw.url + "/health") as response:
        assert response.status == 200


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
    assert "gateway_config_last_reload_successful 0.0" in text
    assert "not-configured" not in text
    # a good reload clears what the failed one set (the "config reload failed" alert)
    gw.config_path.write_text(json.dumps(config(backend)))
    async with http.post(gw.url + "/reload") as response:
        assert response.status == 200
    async with http.get(gw.url + "/metrics") as response:
        assert "gateway_config_last_reload_successful 1.0" in await response.text()


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


async def test_other_files_beside_the_config_do_not_wake_the_watcher(
    make_gateway, backend, capfd
) -> None:
    """A log file next to the config must not feed a reload/log loop."""
    gw = await make_gateway(config(backend), watch=True)
    await asyncio.sleep(0.3)
    neighbour = gw.config_path.parent / "gateway.log"
    for i in range(5):
        neighbour.write_text(f"line {i}\n")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.8)
    assert gw.app[STORE].last_reload is None
    assert "change detected" not in capfd.readouterr().err
