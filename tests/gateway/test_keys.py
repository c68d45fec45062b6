"""Client keys: 401 without a valid one, 403 for a model the key may not use, /v1/models
filtered per key, and per-key limits with OpenAI's rate-limit headers."""

from __future__ import annotations

import asyncio
import hashlib

import openai
import pytest
from aiohttp import web

from gateway.state import METRICS, USAGE_LOG
from tests.gateway.backend import Received

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef"


def config(backend, **alice_limits) -> dict:
    return {
        "endpoints": {
            "llama-8b": {"url": backend.url, "apiKey": "sk-backend-key-000000"},
            "llama-70b": {"url": backend.url},
            "gpt-4o": {"url": backend.url},
        },
        "keys": [
            {"name": "alice", "key": ALICE, "models": ["llama-*"], **alice_limits},
            {"name": "bob", "key": "sha256:" + hashlib.sha256(BOB.encode()).hexdigest()},
        ],
    }


async def test_requests_need_a_valid_key(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    for headers, code in (
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer nope-nope-nope"}, "invalid_api_key"),
    ):
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/chat/completions"),
        ):
            async with http.request(
                method, gw.url + path, json={"model": "llama-8b"}, headers=headers
            ) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == code
    assert backend.received == []
    # health and readiness stay open for probes
    async with http.get(gw.url + "/health") as r:
        assert r.status == 200


async def test_models_are_filtered_per_key(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    assert [m.id async for m in gw.openai(api_key=ALICE).models.list()] == ["llama-8b", "llama-70b"]
    assert [m.id async for m in gw.openai(api_key=BOB).models.list()] == [
        "llama-8b",
        "llama-70b",
        "gpt-4o",
    ]
    with pytest.raises(openai.NotFoundError):
        await gw.openai(api_key=ALICE).models.retrieve("gpt-4o")


async def test_model_not_allowed_is_403_and_unknown_lists_only_allowed(
    make_gateway, backend
) -> None:
    gw = await make_gateway(config(backend))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gw.openai(api_key=ALICE).chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.body["code"] == "model_not_allowed"
    with pytest.raises(openai.NotFoundError) as unknown:
        await gw.openai(api_key=ALICE).chat.completions.create(model="nope", messages=[])
    assert "gpt-4o" not in unknown.value.body["message"]
    assert backend.received == []
    completion = await gw.openai(api_key=BOB).chat.completions.create(model="gpt-4o", messages=[])
    assert completion.model == "gpt-4o"


async def test_client_key_is_never_forwarded(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    await gw.openai(api_key=ALICE).chat.completions.create(model="llama-8b", messages=[])
    assert backend.last.headers["Authorization"] == "Bearer sk-backend-key-000000"
    await gw.openai(api_key=ALICE).chat.completions.create(model="llama-70b", messages=[])
    assert "Authorization" not in backend.last.headers


async def test_requests_per_minute(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend, rpm=2))
    client = gw.openai(api_key=ALICE)
    first = await client.chat.completions.with_raw_response.create(model="llama-8b", messages=[])
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    await client.chat.completions.create(model="llama-8b", messages=[])
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="llama-8b", messages=[])
    headers = caught.value.response.headers
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert len(backend.received) == 2
    # another key has its own window
    await gw.openai(api_key=BOB).chat.completions.create(model="llama-8b", messages=[])


async def test_tokens_per_minute_from_usage(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend, tpm=15))
    client = gw.openai(api_key=ALICE)
    await client.chat.completions.create(model="llama-8b", messages=[])  # 10 tokens
    stream = await client.chat.completions.create(model="llama-8b", messages=[], stream=True)
    [c async for c in stream]  # 10 more, counted although the client did not ask for usage
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="llama-8b", messages=[])
    assert "tokens per minute" in caught.value.body["message"]
    assert caught.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_concurrency_per_key(make_gateway, backend) -> None:
    async def slow(request: web.Request, received: Received) -> web.Response:
        await asyncio.sleep(0.5)
        return web.json_response({"model": "x", "choices": []})

    backend.handler = slow
    gw = await make_gateway(config(backend, maxConcurrent=1))
    client = gw.openai(api_key=ALICE)
    results = await asyncio.gather(
        *(client.chat.completions.create(model="llama-8b", messages=[]) for _ in range(2)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, openai.RateLimitError) for r in results) == 1


async def test_usage_per_key_in_metrics_and_no_key_anywhere(
    make_gateway, backend, http, capfd
) -> None:
    gw = await make_gateway(config(backend))
    await gw.openai(api_key=ALICE).chat.completions.create(model="llama-8b", messages=[])
    text = gw.app[METRICS].render().decode()
    assert 'gateway_key_requests_total{key="alice",model="llama-8b",status="200"} 1.0' in text
    assert 'gateway_key_tokens_total{key="alice",model="llama-8b",type="completion"} 3.0' in text
    async with http.get(gw.url + "/debug") as r:
        debug = await r.text()
    assert '"name": "alice"' in debug
    for secret in (ALICE, BOB):
        assert secret not in debug and secret not in text
    assert ALICE not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("key", "error"),
    [("short", "at least 8 characters"), ("sha256:abc", "64 hex digits")],
)
async def test_bad_keys_are_config_errors(make_gateway, backend, key, error) -> None:
    from gateway.config import ConfigError

    cfg = {"endpoints": {"m": {"url": backend.url}}, "keys": [{"name": "x", "key": key}]}
    with pytest.raises(ConfigError) as caught:
        await make_gateway(cfg)
    assert any(error in e for e in caught.value.errors)


async def test_usage_log_has_a_line_per_request(make_gateway, backend, tmp_path) -> None:
    import json

    path = tmp_path / "logs" / "usage.jsonl"
    gw = await make_gateway({**config(backend), "usageLog": str(path)})
    client = gw.openai(api_key=ALICE)
    await client.chat.completions.create(model="llama-8b", messages=[])
    stream = await client.chat.completions.create(model="llama-70b", messages=[], stream=True)
    [c async for c in stream]
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="gpt-4o", messages=[])
    await gw.openai(api_key=ALICE).models.list()  # not a model request: no line
    await asyncio.to_thread(gw.app[USAGE_LOG].wait_written)  # a thread writes the lines
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["key"], e["model"], e["status"]) for e in lines] == [
        ("alice", "llama-8b", 200),
        ("alice", "llama-70b", 200),
    ]
    assert all(e["prompt_tokens"] == 7 and e["completion_tokens"] == 3 for e in lines)
    assert ALICE not in path.read_text()
