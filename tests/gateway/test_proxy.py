"""Chat, completions and embeddings through the openai SDK: model ids rewritten both ways,
the backend's key injected, the client's credentials and hop-by-hop headers kept back."""

from __future__ import annotations

from aiohttp import web

from tests.gateway.backend import Received


def config(backend, **extra):
    return {
        "endpoints": {
            "llama": {
                "url": backend.url,
                "displayName": "Llama",
                "apiKey": "sk-backend-secret-0001",
                "actualModelName": "meta-llama/Llama-3-8B",
                **extra,
            }
        }
    }


async def test_chat_rewrites_model_both_ways(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    raw = await gw.openai().chat.completions.with_raw_response.create(
        model="llama", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert backend.last.path == "/v1/chat/completions"
    assert backend.last.json()["model"] == "meta-llama/Llama-3-8B"
    assert backend.last.json()["messages"] == [{"role": "user", "content": "hi"}]
    assert completion.model == "llama"
    assert completion.choices[0].message.content == "Hello!"
    assert raw.headers["x-gateway-upstream-model"] == "meta-llama/Llama-3-8B"


async def test_backend_key_injected_and_client_key_never_forwarded(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    await gw.openai(api_key="client-secret-xyz").chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}]
    )
    headers = {k.lower(): v for k, v in backend.last.headers.items()}
    assert headers["authorization"] == "Bearer sk-backend-secret-0001"
    assert "client-secret-xyz" not in repr(backend.last.headers)


async def test_no_key_configured_sends_no_authorization(make_gateway, backend, http) -> None:
    gw = await make_gateway({"endpoints": {"m": {"url": backend.url}}})
    async with http.post(
        gw.url + "/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"Authorization": "Bearer client-secret-xyz", "X-Api-Key": "other-secret"},
    ) as response:
        assert response.status == 200
    lowered = {k.lower() for k in backend.last.headers}
    assert "authorization" not in lowered
    assert "x-api-key" not in lowered
    # no actualModelName: the public id is sent as is
    assert backend.last.json()["model"] == "m"


async def test_hop_by_hop_headers_dropped_request_id_forwarded(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions",
        json={"model": "llama", "messages": []},
        headers={
            "X-Request-ID": "req-abc-123",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Proxy-Authorization": "Basic Zm9v",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Custom": "kept",
        },
    ) as response:
        assert response.status == 200
        assert response.headers["X-Request-ID"] == "req-abc-123"
    lowered = {k.lower(): v for k, v in backend.last.headers.items()}
    assert lowered["x-request-id"] == "req-abc-123"
    assert lowered["x-custom"] == "kept"
    for hop in ("x-secret-hop", "proxy-authorization", "keep-alive", "te"):
        assert hop not in lowered
    assert lowered["host"] == f"127.0.0.1:{backend.port}"


async def test_request_id_made_when_missing_or_unsafe(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    for given in (None, "bad id\twith spaces"):
        headers = {} if given is None else {"X-Request-ID": given}
        async with http.post(
            gw.url + "/v1/chat/completions",
            json={"model": "llama", "messages": []},
            headers=headers,
        ) as response:
            made = response.headers["X-Request-ID"]
        assert made and made != given
        assert backend.last.headers["X-Request-ID"] == made


async def test_completions_and_embeddings(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend))
    client = gw.openai()
    completion = await client.completions.create(model="llama", prompt="Hello")
    assert completion.model == "llama"
    assert backend.last.path == "/v1/completions"
    assert backend.last.json()["model"] == "meta-llama/Llama-3-8B"

    embeddings = await client.embeddings.create(model="llama", input=["a", "b"])
    assert embeddings.model == "llama"
    assert len(embeddings.data) == 2
    assert backend.last.path == "/v1/embeddings"
    assert backend.last.json()["model"] == "meta-llama/Llama-3-8B"


async def test_routes_work_without_v1_prefix(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/chat/completions", json={"model": "llama", "messages": []}
    ) as response:
        assert response.status == 200
        assert (await response.json())["model"] == "llama"
    assert backend.last.path == "/v1/chat/completions"


async def test_bare_origin_url_means_v1(make_gateway, backend) -> None:
    gw = await make_gateway({"endpoints": {"m": {"url": f"http://127.0.0.1:{backend.port}"}}})
    await gw.openai().chat.completions.create(model="m", messages=[])
    assert backend.last.path == "/v1/chat/completions"


async def test_base_url_path_kept_as_configured(make_gateway, backend) -> None:
    url = f"http://127.0.0.1:{backend.port}/api/openai/v1/"
    gw = await make_gateway({"endpoints": {"m": {"url": url}}})
    await gw.openai().chat.completions.create(model="m", messages=[])
    assert backend.last.path == "/api/openai/v1/chat/completions"


async def test_configured_headers_sent_to_backend(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend, headers={"OpenAI-Organization": "org-1"}))
    await gw.openai().chat.completions.create(model="llama", messages=[])
    assert backend.last.headers["OpenAI-Organization"] == "org-1"


async def test_query_string_forwarded(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend))
    async with http.post(
        gw.url + "/v1/chat/completions?api-version=2024-06-01",
        json={"model": "llama", "messages": []},
    ) as response:
        assert response.status == 200
    assert backend.last.query == "api-version=2024-06-01"


async def test_large_request_body_accepted(make_gateway, backend) -> None:
    """Vision requests carry base64 images far above aiohttp's 1 MiB default."""
    gw = await make_gateway(config(backend))
    image = "A" * (5 * 1024 * 1024)
    await gw.openai().chat.completions.create(
        model="llama",
        messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}
        ],
    )
    assert len(backend.last.body) > 5 * 1024 * 1024


async def test_body_over_limit_is_413(make_gateway, backend, http) -> None:
    gw = await make_gateway({**config(backend), "maxRequestBytes": 1000})
    async with http.post(
        gw.url + "/v1/chat/completions",
        json={"model": "llama", "messages": [{"role": "user", "content": "x" * 2000}]},
    ) as response:
        assert response.status == 413
        body = await response.json()
    assert body["error"]["code"] == "request_too_large"
    assert backend.received == []


async def test_backend_json_without_model_passes_unchanged(make_gateway, backend, http) -> None:
    async def handler(request: web.Request, received: Received) -> web.Response:
        return web.Response(
            body=b'{"ok": true,  "spacing": "kept"}', content_type="application/json"
        )

    backend.handler = handler
    gw = await make_gateway(config(backend))
    async with http.post(gw.url + "/v1/chat/completions", json={"model": "llama"}) as response:
        assert await response.read() == b'{"ok": true,  "spacing": "kept"}'


async def test_expect_100_continue_from_clients_like_curl(make_gateway, backend, http) -> None:
    """curl sends `Expect: 100-continue` for bodies over 1 MB; the gateway answers it and does
    not pass it on, since it already holds the whole body."""
    gw = await make_gateway(config(backend))
    body = {"model": "llama", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    async with http.post(gw.url + "/v1/chat/completions", json=body, expect100=True) as response:
        assert response.status == 200
    assert "expect" not in {k.lower() for k in backend.last.headers}
    assert len(backend.last.body) > 2_000_000
