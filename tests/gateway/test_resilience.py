"""Several backends per model: failover before the first byte, circuit breaker, selection
policies, maxConcurrent, /ready, wildcard routes. Each test checks what the client saw and
what the backends received."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from aiohttp import web

from gateway.state import BACKENDS, DRAINING, METRICS
from tests.gateway.backend import Received, chunk, sse, start_sse
from tests.gateway.test_failures import free_port


def multi(*urls: str, **extra) -> dict:
    return {"endpoints": {"m": {"backends": [{"url": u} for u in urls], **extra}}}


async def ok_after(seconds: float, model: str = "m") -> web.Response:
    await asyncio.sleep(seconds)
    return web.json_response({"model": model, "choices": [], "object": "chat.completion"})


def answering(status: int, headers: dict[str, str] | None = None):
    async def handler(request: web.Request, received: Received) -> web.Response:
        body = {
            "error": {"message": f"backend says {status}", "type": "x", "param": None, "code": None}
        }
        return web.json_response(body, status=status, headers=headers or {})

    return handler


# --- failover before the first byte ----------------------------------------------------------


async def test_refused_backend_fails_over(make_gateway, backend) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = await make_gateway(multi(dead, backend.url, strategy="priority"))
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.model == "m"
    assert len(backend.received) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_error_statuses_fail_over_to_another_backend(
    make_gateway, make_backend, status
) -> None:
    bad, good = await make_backend(), await make_backend()
    bad.handler = answering(status)
    gw = await make_gateway(multi(bad.url, good.url, strategy="priority"))
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.model == "m"
    assert (len(bad.received), len(good.received)) == (1, 1)


async def test_stall_before_first_byte_fails_over(make_gateway, make_backend) -> None:
    slow, good = await make_backend(), await make_backend()

    async def stall(request: web.Request, received: Received) -> web.Response:
        return await ok_after(30)

    slow.handler = stall
    cfg = multi(slow.url, good.url, strategy="priority", timeouts={"firstByte": 0.5})
    gw = await make_gateway(cfg)
    started = time.monotonic()
    stream = await gw.openai().chat.completions.create(model="m", messages=[], stream=True)
    assert [c.model async for c in stream] == ["m"] * 4
    assert time.monotonic() - started < 5
    assert len(good.received) == 1
    await asyncio.wait_for(slow.cancelled.wait(), 5)  # the stalled attempt was abandoned


async def test_garbage_backend_fails_over(make_gateway, backend) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(
            multi(f"http://127.0.0.1:{port}/v1", backend.url, strategy="priority")
        )
        completion = await gw.openai().chat.completions.create(model="m", messages=[])
        assert completion.model == "m" and len(backend.received) == 1
    finally:
        server.close()


async def test_no_retry_after_the_stream_started(make_gateway, make_backend, http) -> None:
    """Once bytes reached the client, a failure ends the stream with an error event; the
    other backend is never asked (the client would get the answer twice)."""
    first, second = await make_backend(), await make_backend()

    async def dies(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("m", "partial")))
        await asyncio.sleep(0.1)
        request.transport.close()
        return response

    first.handler = dies
    gw = await make_gateway(multi(first.url, second.url, strategy="priority"))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "m", "stream": True}
    ) as response:
        body = await response.read()
    events = body.split(b"\n\n")
    assert b"partial" in events[0]
    assert json.loads(events[1][6:])["error"]["code"] == "died"
    assert b"[DONE]" not in body
    assert second.received == []


async def test_retries_are_bounded(make_gateway, make_backend) -> None:
    backends = [await make_backend() for _ in range(4)]
    for b in backends:
        b.handler = answering(503)
    gw = await make_gateway(multi(*(b.url for b in backends), strategy="priority", retries=2))
    with pytest.raises(openai.InternalServerError) as caught:
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert caught.value.status_code == 503  # the last backend's own answer
    assert [len(b.received) for b in backends] == [1, 1, 1, 0]


async def test_retry_after_is_honoured_on_a_single_backend(make_gateway, backend) -> None:
    answers = iter([answering(429, {"Retry-After": "1"}), None])

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        nxt = next(answers)
        return await (nxt(request, received) if nxt else ok_after(0))

    backend.handler = handler
    gw = await make_gateway({"endpoints": {"m": {"url": backend.url}}})
    started = time.monotonic()
    await gw.openai().chat.completions.create(model="m", messages=[])
    assert time.monotonic() - started >= 0.9
    assert len(backend.received) == 2


async def test_long_retry_after_is_passed_to_the_client(make_gateway, backend) -> None:
    backend.handler = answering(429, {"Retry-After": "120"})
    gw = await make_gateway({"endpoints": {"m": {"url": backend.url}}})
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert time.monotonic() - started < 2
    assert caught.value.response.headers["Retry-After"] == "120"
    assert len(backend.received) == 1


async def test_client_errors_are_not_retried(make_gateway, make_backend) -> None:
    first, second = await make_backend(), await make_backend()
    first.handler = answering(400)
    gw = await make_gateway(multi(first.url, second.url, strategy="priority"))
    with pytest.raises(openai.BadRequestError):
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert (len(first.received), len(second.received)) == (1, 0)


# --- passive health: the circuit breaker ------------------------------------------------------


async def test_failing_backend_is_ejected_then_probed_back(
    make_gateway, make_backend, http
) -> None:
    flaky, good = await make_backend(), await make_backend()
    flaky.handler = answering(500)
    cfg = multi(
        flaky.url, good.url, strategy="priority", circuitBreaker={"failures": 2, "cooldown": 1}
    )
    gw = await make_gateway(cfg)
    client = gw.openai()
    for _ in range(2):
        await client.chat.completions.create(model="m", messages=[])
    assert len(flaky.received) == 2  # two consecutive failures: ejected
    for _ in range(5):
        await client.chat.completions.create(model="m", messages=[])
    assert len(flaky.received) == 2  # ejected: not asked any more
    assert len(good.received) == 7
    text = gw.app[METRICS].render().decode()
    assert f'gateway_backend_up{{backend="127.0.0.1:{flaky.port}"}} 0.0' in text
    assert f'gateway_backend_ejections_total{{backend="127.0.0.1:{flaky.port}"}} 1.0' in text

    # after the cooldown one request probes it; it has recovered, so it takes traffic again
    flaky.handler = lambda request, received: ok_after(0)
    await asyncio.sleep(1.1)
    await client.chat.completions.create(model="m", messages=[])
    assert len(flaky.received) == 3
    async with http.get(gw.url + "/debug") as response:
        live = (await response.json())["config"]["endpoints"]["m"]["backends"][0]["live"]
    assert live["state"] == "healthy" and live["ejections"] == 1


async def test_failed_probe_ejects_again(make_gateway, make_backend) -> None:
    flaky, good = await make_backend(), await make_backend()
    flaky.handler = answering(500)
    cfg = multi(
        flaky.url, good.url, strategy="priority", circuitBreaker={"failures": 1, "cooldown": 0.5}
    )
    gw = await make_gateway(cfg)
    client = gw.openai()
    await client.chat.completions.create(model="m", messages=[])
    await asyncio.sleep(0.6)
    await client.chat.completions.create(model="m", messages=[])  # the probe fails
    await client.chat.completions.create(model="m", messages=[])
    assert len(flaky.received) == 2
    assert (
        gw.app[BACKENDS].states and max(s.ejections for s in gw.app[BACKENDS].states.values()) == 2
    )


async def test_flapping_backend_never_costs_the_client_a_request(
    make_gateway, make_backend
) -> None:
    flappy, steady = await make_backend(), await make_backend()
    count = 0

    async def flap(request: web.Request, received: Received) -> web.Response:
        nonlocal count
        count += 1
        return await (answering(503)(request, received) if count % 2 else ok_after(0))

    flappy.handler = flap
    gw = await make_gateway(
        multi(flappy.url, steady.url, circuitBreaker={"failures": 2, "cooldown": 0.2})
    )
    client = gw.openai()
    results = await asyncio.gather(
        *(client.chat.completions.create(model="m", messages=[]) for _ in range(40))
    )
    assert all(r.model == "m" for r in results)
    assert len(flappy.received) + len(steady.received) >= 40


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
    # what the "every backend of a model ejected" alert reads
    text = gw.app[METRICS].render().decode()
    assert 'gateway_model_backends_up{model="down"} 0.0' in text
    assert 'gateway_model_backends_up{model="up"} 1.0' in text
    gw.app[DRAINING].set()
    async with http.get(gw.url + "/ready") as response:
        assert response.status == 503 and (await response.json())["status"] == "draining"


async def test_active_health_checks_eject_and_restore(make_gateway, make_backend) -> None:
    first, second = await make_backend(), await make_backend()
    healthy = False

    async def models(request: web.Request, received: Received) -> web.Response:
        if request.path.endswith("/models"):
            return web.json_response({"data": []}, status=200 if healthy else 503)
        return await ok_after(0)

    first.handler = models
    cfg = multi(
        first.url,
        second.url,
        strategy="priority",
        healthCheck={"interval": 0.2, "timeout": 1},
        circuitBreaker={"failures": 2, "cooldown": 60},
    )
    gw = await make_gateway(cfg)
    await asyncio.sleep(1.2)  # a few failing probes
    await gw.openai().chat.completions.create(model="m", messages=[])
    assert [r.path for r in first.received if not r.path.endswith("/models")] == []
    assert [r.path for r in second.received if not r.path.endswith("/models")] == [
        "/v1/chat/completions"
    ]
    healthy = True
    await asyncio.sleep(0.8)  # a passing probe restores it before the cooldown
    await gw.openai().chat.completions.create(model="m", messages=[])
    assert first.received[-1].path == "/v1/chat/completions"


# --- selection policies ----------------------------------------------------------------------


async def slow_stream(request: web.Request, received: Received) -> web.StreamResponse:
    response = await start_sse(request)
    for _ in range(5):
        await response.write(sse(chunk("m", "x")))
        await asyncio.sleep(0.1)
    await response.write(b"data: [DONE]\n\n")
    return response


async def test_least_busy_spreads_concurrent_load(make_gateway, make_backend) -> None:
    backends = [await make_backend() for _ in range(3)]
    for b in backends:
        b.handler = slow_stream
    gw = await make_gateway(multi(*(b.url for b in backends)))
    client = gw.openai()

    async def one() -> None:
        stream = await client.chat.completions.create(model="m", messages=[], stream=True)
        [c async for c in stream]

    await asyncio.gather(*(one() for _ in range(30)))
    counts = sorted(len(b.received) for b in backends)
    assert sum(counts) == 30
    assert counts[0] >= 8, counts  # exact in-flight accounting: close to 10 each
    assert all(s.in_flight == 0 for s in gw.app[BACKENDS].states.values())


async def test_least_busy_breaks_ties_at_random(make_gateway, make_backend) -> None:
    """Sequential requests leave every backend idle: ties must not all go to the first."""
    backends = [await make_backend() for _ in range(2)]
    gw = await make_gateway(multi(*(b.url for b in backends)))
    for _ in range(40):
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert min(len(b.received) for b in backends) >= 8


async def test_weighted_round_robin_follows_weights(make_gateway, make_backend) -> None:
    heavy, light = await make_backend(), await make_backend()
    cfg = {
        "endpoints": {
            "m": {
                "backends": [{"url": heavy.url, "weight": 3}, {"url": light.url, "weight": 1}],
                "strategy": "weighted-round-robin",
            }
        }
    }
    gw = await make_gateway(cfg)
    for _ in range(8):
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert (len(heavy.received), len(light.received)) == (6, 2)


async def test_priority_uses_the_primary_while_it_is_healthy(make_gateway, make_backend) -> None:
    primary, fallback = await make_backend(), await make_backend()
    gw = await make_gateway(multi(primary.url, fallback.url, strategy="priority"))
    for _ in range(5):
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert (len(primary.received), len(fallback.received)) == (5, 0)


async def test_per_backend_model_name_and_key(make_gateway, make_backend) -> None:
    a, b = await make_backend(), await make_backend()
    cfg = {
        "endpoints": {
            "m": {
                "actualModelName": "default-name",
                "apiKey": "sk-endpoint-default-key",
                "strategy": "priority",
                "backends": [
                    {"url": a.url, "actualModelName": "a-name", "apiKey": "sk-backend-a-key-0"},
                    {"url": b.url},
                ],
            }
        }
    }
    gw = await make_gateway(cfg)
    await gw.openai().chat.completions.create(model="m", messages=[])
    a.handler = answering(503)
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.model == "m"
    assert a.received[0].json()["model"] == "a-name"
    assert a.received[0].headers["Authorization"] == "Bearer sk-backend-a-key-0"
    assert b.received[0].json()["model"] == "default-name"
    assert b.received[0].headers["Authorization"] == "Bearer sk-endpoint-default-key"


# --- maxConcurrent --------------------------------------------------------------------------


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


# --- wildcard routes --------------------------------------------------------------------------


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


async def test_probe_abandoned_by_its_client_does_not_block_the_backend(
    make_gateway, backend, http
) -> None:
    calls = 0

    async def handler(request: web.Request, received: Received) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return await answering(500)(request, received)
        if calls == 2:
            return await ok_after(5)  # the probe: its client gives up first
        return await ok_after(0)

    backend.handler = handler
    cfg = {
        "endpoints": {"m": {"url": backend.url}},
        "retries": 0,
        "circuitBreaker": {"failures": 1, "cooldown": 0.3},
    }
    gw = await make_gateway(cfg)
    with pytest.raises(openai.InternalServerError):
        await gw.openai().chat.completions.create(model="m", messages=[])
    await asyncio.sleep(0.4)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await http.post(gw.url + "/v1/chat/completions", json={"model": "m"})
    await asyncio.sleep(0.2)
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.model == "m" and calls == 3


# --- failures after the backend's headers but before anything reached the client ----------


async def test_stream_dying_before_its_first_event_fails_over(
    make_gateway, make_backend, http
) -> None:
    """Headers alone are not a byte to the client: the stream is retried elsewhere."""
    broken, good = await make_backend(), await make_backend()

    async def headers_then_death(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(b": warming up\n")  # not even a whole event
        await asyncio.sleep(0.05)
        request.transport.close()
        return response

    broken.handler = headers_then_death
    gw = await make_gateway(multi(broken.url, good.url, strategy="priority"))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "m", "stream": True}
    ) as response:
        body = await response.read()
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    assert (len(broken.received), len(good.received)) == (1, 1)


async def test_json_body_cut_short_fails_over(make_gateway, make_backend) -> None:
    broken, good = await make_backend(), await make_backend()

    async def truncated(request: web.Request, received: Received) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": "500"}
        )
        await response.prepare(request)
        await response.write(b'{"model": "m", "choi')
        await asyncio.sleep(0.05)
        request.transport.close()
        return response

    broken.handler = truncated
    gw = await make_gateway(multi(broken.url, good.url, strategy="priority"))
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.choices[0].message.content == "Hello!"
    assert (len(broken.received), len(good.received)) == (1, 1)


async def test_breaker_keeps_out_a_backend_whose_streams_die(
    make_gateway, make_backend, http
) -> None:
    """Streams that start and then die count as failures, and requests already under way
    when the backend was ejected do not bring it back: only the half-open probe does."""
    dying, good = await make_backend(), await make_backend()

    async def dies_after_one_event(request: web.Request, received: Received) -> web.StreamResponse:
        # Staggered, so some answers start only after the backend has been ejected.
        await asyncio.sleep(0.03 * len(dying.received))
        response = await start_sse(request)
        await response.write(sse(chunk("m", "partial")))
        await asyncio.sleep(0.02)
        request.transport.close()
        return response

    dying.handler = dies_after_one_event
    good.handler = slow_stream  # keeps good busier, so least-busy prefers the dying one
    gw = await make_gateway(
        multi(dying.url, good.url, circuitBreaker={"failures": 3, "cooldown": 30})
    )

    async def one() -> bytes:
        async with http.post(
            gw.url + "/v1/chat/completions", json={"model": "m", "stream": True}
        ) as response:
            return await response.read()

    bodies = []
    for _ in range(4):
        bodies += await asyncio.gather(*(one() for _ in range(10)))
    cut = [b for b in bodies if b'"error"' in b]
    assert len(dying.received) <= 3 + 10  # ejected within the first wave, and stays out
    assert len(cut) == len(dying.received)
    assert len(bodies) - len(cut) == len(good.received)
    state = next(s for s in gw.app[BACKENDS].states.values() if s.label.endswith(str(dying.port)))
    assert state.health(time.monotonic()) == "ejected"
