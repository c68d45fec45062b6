"""Active health checks: probes of `GET /models` eject a backend and restore it."""

from __future__ import annotations

from aiohttp import web

from tests.gateway.backend import Received, ok_after
from tests.gateway.configs import multi
from tests.gateway.waiting import health_of, until


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
    await until(lambda: health_of(gw.app, first.port) == "ejected", what="two failing probes")
    await gw.openai().chat.completions.create(model="m", messages=[])
    assert [r.path for r in first.received if not r.path.endswith("/models")] == []
    assert [r.path for r in second.received if not r.path.endswith("/models")] == [
        "/v1/chat/completions"
    ]
    healthy = True
    # a passing probe restores it long before the 60 s cooldown
    await until(lambda: health_of(gw.app, first.port) == "healthy", what="a passing probe")
    await gw.openai().chat.completions.create(model="m", messages=[])
    # (probes keep arriving, so the last request seen may be one: look past them)
    assert [r.path for r in first.received if not r.path.endswith("/models")] == [
        "/v1/chat/completions"
    ]
