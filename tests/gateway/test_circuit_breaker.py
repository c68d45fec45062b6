"""Passive health: the circuit breaker ejects a backend that keeps failing real requests.

After the cooldown one probe request decides whether it comes back."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from aiohttp import web

from gateway.state import BACKENDS, METRICS
from tests.gateway.backend import Received, answering, chunk, ok_after, slow_stream, sse, start_sse
from tests.gateway.configs import multi
from tests.gateway.waiting import health_of, state_of, until


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
    await until(lambda: health_of(gw.app, flaky.port) == "half-open", what="the cooldown")
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
    await until(lambda: health_of(gw.app, flaky.port) == "half-open", what="the cooldown")
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
    await until(lambda: health_of(gw.app, backend.port) == "half-open", what="the cooldown")
    probe = asyncio.create_task(http.post(gw.url + "/v1/chat/completions", json={"model": "m"}))
    await until(lambda: calls == 2, what="the probe reaching the backend")
    probe.cancel()  # its client gives up
    with pytest.raises(asyncio.CancelledError):
        await probe
    state = state_of(gw.app, backend.port)
    await until(lambda: state.in_flight == 0, what="the gateway giving up the abandoned probe")
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.model == "m" and calls == 3


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
