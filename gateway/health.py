"""Active health checks: optional, cheap (`GET <url>/models`, never a completion), feeding
the same circuit breaker as passive detection from real traffic."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import structlog
from aiohttp import web

from gateway.backends import Ticket
from gateway.background import TICK
from gateway.routing import Route, Target
from gateway.state import BACKENDS, DNS, SESSION, STORE
from gateway.upstream import get_models

log = structlog.get_logger("gateway.health")


async def probe(session: aiohttp.ClientSession, route: Route, target: Target) -> str | None:
    """None when healthy, else what went wrong."""
    check = route.health_check
    try:
        async with asyncio.timeout(check.timeout):
            status, _ = await get_models(session, target, check.path)
    except TimeoutError:
        return "health_timeout"
    except (aiohttp.ClientError, OSError):
        return "health_unreachable"
    return None if status < 500 else f"health_http_{status}"


async def run_health_checks(app: web.Application) -> None:
    """Probe every backend whose route sets healthCheck.interval, each on its own clock."""
    due: dict[str, float] = {}
    while True:
        await asyncio.sleep(TICK)
        now = time.monotonic()
        jobs = []
        checked: set[str] = set()
        for route in app[STORE].current.routes.values():
            interval = route.health_check.interval
            if interval is None:
                continue
            for target in app[DNS].expand(route).targets:
                checked.add(target.key)
                if due.get(target.key, 0.0) <= now:
                    due[target.key] = now + interval
                    jobs.append(_check(app, route, target))
        for gone in due.keys() - checked:  # removed by a reload, or its checks switched off
            del due[gone]
        if jobs:
            await asyncio.gather(*jobs)


async def _check(app: web.Application, route: Route, target: Target) -> None:
    backends = app[BACKENDS]
    state = backends.state(target)
    if state.probing:
        return  # real traffic is probing it already
    problem = await probe(app[SESSION], route, target)
    # An active check is a probe: it may close the breaker, or keep it open.
    ticket = Ticket(state, probe=state.health(time.monotonic()) != "healthy")
    if problem is None:
        backends.succeeded(ticket)
    else:
        log.info("health check failed", backend=target.label, problem=problem)
        backends.failed(ticket, route.circuit_breaker, problem)
