"""The background task that keeps each cache-aware route's load signals fresh: every backend's
own /metrics, scraped at the route's `cacheAware.metricsInterval`."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gateway.background import TICK as IDLE_TICK
from gateway.cache_aware import CacheAwarePolicy
from gateway.state import BACKENDS, POLICIES, SESSION, STORE

TICK = 0.05  # seconds between looks at what is due (intervals below this are rounded up)


async def run_scrapes(app: web.Application) -> None:
    due: dict[tuple[str, str], float] = {}
    running: dict[tuple[str, str], asyncio.Task[None]] = {}
    idle = False
    while True:
        # No cache-aware route: look again only as often as the other polling tasks do.
        await asyncio.sleep(IDLE_TICK if idle else TICK)
        now = time.monotonic()
        seen: set[tuple[str, str]] = set()
        for route in app[STORE].current.routes.values():
            if route.strategy != "cache-aware" or len(route.targets) < 2:
                continue
            policy = app[POLICIES].for_route(route)
            assert isinstance(policy, CacheAwarePolicy)
            settings = route.cache_aware
            policy.signals.retain(t.key for t in route.targets)
            for target in route.targets:
                slot = (route.public_id, target.key)
                seen.add(slot)
                busy = running.get(slot)
                if due.get(slot, 0.0) > now or (busy is not None and not busy.done()):
                    continue
                due[slot] = now + settings.metrics_interval
                limit = min(settings.metrics_interval * 4, settings.metrics_stale_after)
                state = app[BACKENDS].state(target)
                task = asyncio.create_task(
                    policy.signals.scrape(
                        app[SESSION],
                        target,
                        settings.metrics_path,
                        limit,
                        lambda state=state: state.in_flight,
                    )
                )
                running[slot] = task  # one scrape at a time per backend: slow ones do not pile up
        idle = not seen
        for gone in due.keys() - seen:
            del due[gone]
            running.pop(gone, None)
