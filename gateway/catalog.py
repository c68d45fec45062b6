"""Wildcard routes list their backend's own models: fetched from its `/models` and kept
here, so /v1/models still answers from memory."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import structlog

from gateway.routing import Route
from gateway.upstream import get_models

log = structlog.get_logger("gateway.discovery")

RETRY_AFTER_FAILURE = 10.0
LIST_TIMEOUT = 10.0


class Catalog:
    """Backend model ids per wildcard route (without the route's prefix)."""

    def __init__(self) -> None:
        self._models: dict[str, list[str]] = {}
        self._due: dict[str, float] = {}

    def models(self, route: Route) -> list[str]:
        return self._models.get(route.public_id, [])

    async def refresh(self, session: aiohttp.ClientSession, route: Route) -> None:
        for target in route.targets:
            try:
                async with asyncio.timeout(LIST_TIMEOUT):
                    status, payload = await get_models(session, target)
            except (aiohttp.ClientError, OSError, TimeoutError):
                continue
            if status != 200:
                continue
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, list):
                continue
            ids = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
            self._models[route.public_id] = list(dict.fromkeys(ids))
            self._due[route.public_id] = time.monotonic() + route.models_refresh
            return
        log.warning("could not list the models of a wildcard route", route=route.public_id)
        self._due[route.public_id] = time.monotonic() + min(
            route.models_refresh, RETRY_AFTER_FAILURE
        )

    def due(self, route: Route, now: float) -> bool:
        return self._due.get(route.public_id, 0.0) <= now
