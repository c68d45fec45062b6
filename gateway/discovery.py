"""The background task that keeps wildcard routes' model lists fresh."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gateway.background import TICK
from gateway.state import CATALOG, SESSION, STORE


async def run_discovery(app: web.Application) -> None:
    catalog = app[CATALOG]
    while True:
        now = time.monotonic()
        routes = [
            r for r in app[STORE].current.routes.values() if r.wildcard and catalog.due(r, now)
        ]
        if routes:
            await asyncio.gather(*(catalog.refresh(app[SESSION], r) for r in routes))
        await asyncio.sleep(TICK)
