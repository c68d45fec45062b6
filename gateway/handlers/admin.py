"""Operator endpoints: /health, /debug, /reload, /metrics."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.observe import record_of
from gateway.redact import mask
from gateway.routing import Snapshot
from gateway.state import METRICS, SETTINGS, STORE
from wire.errors import AUTHENTICATION, INVALID_REQUEST, APIError


def _require_admin(request: web.Request) -> None:
    """With GATEWAY_ADMIN_KEY set, /debug and /reload need it as a bearer token."""
    admin_key = request.app[SETTINGS].admin_key
    if not admin_key:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), admin_key.encode()
    ):
        raise APIError(
            401,
            "This endpoint needs the admin key: 'Authorization: Bearer <GATEWAY_ADMIN_KEY>'.",
            AUTHENTICATION,
            None,
            "invalid_admin_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def health(request: web.Request) -> web.Response:
    record_of(request).route = "health"
    return web.json_response({"status": "ok"})


def _masked_config(snapshot: Snapshot) -> dict[str, Any]:
    endpoints = {}
    for model_id, route in snapshot.routes.items():
        url = route.base_url
        if url.password:
            url = url.with_password("***")
        endpoints[model_id] = {
            "displayName": route.display_name,
            "url": str(url),
            "apiKey": mask(route.api_key),
            "actualModelName": route.upstream_model,
            "headers": {name: mask(value) for name, value in route.headers.items()},
            "timeouts": route.timeouts.model_dump(by_alias=True),
        }
    config = snapshot.config
    return {
        "endpoints": endpoints,
        "timeouts": config.timeouts.model_dump(by_alias=True),
        "allowOrigins": list(config.allow_origins),
        "maxRequestBytes": config.max_request_bytes,
    }


async def debug(request: web.Request) -> web.Response:
    record_of(request).route = "debug"
    _require_admin(request)
    store = request.app[STORE]
    snapshot = store.current
    return web.json_response(
        {
            "version": snapshot.version,
            "source": snapshot.source,
            "loadedAt": snapshot.loaded_at,
            "lastReload": store.last_reload.as_dict() if store.last_reload else None,
            "config": _masked_config(snapshot),
        }
    )


async def reload(request: web.Request) -> web.Response:
    record_of(request).route = "reload"
    _require_admin(request)
    outcome = request.app[STORE].reload("api")
    if not outcome.ok:
        raise APIError(
            400,
            "The config file is invalid; the previous config keeps serving. "
            + " ".join(f"{request.app[STORE].path}: {line}." for line in outcome.errors),
            INVALID_REQUEST,
            None,
            "invalid_config",
        )
    return web.json_response({"status": "reloaded", **outcome.as_dict()})


async def metrics(request: web.Request) -> web.Response:
    record_of(request).route = "metrics"
    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/debug", debug)
    app.router.add_post("/reload", reload)
    app.router.add_get("/metrics", metrics)
