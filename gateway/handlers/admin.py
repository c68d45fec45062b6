"""Operator endpoints: /health, /ready, /debug, /reload, /metrics, /usage."""

from __future__ import annotations

import hmac
import os
import signal
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from yarl import URL

from gateway.backends import Backends
from gateway.cache_aware import CacheAwarePolicy
from gateway.dns_discovery import DnsDiscovery
from gateway.middleware import record_of
from gateway.redact import mask
from gateway.routing import Snapshot, Target
from gateway.state import BACKENDS, DNS, DRAINING, LIMITER, METRICS, POLICIES, SETTINGS, STORE
from wire.errors import APIError
from wire.headers import bearer_token
from wire.protocol_errors import expect_continue


def _require_admin(request: web.Request) -> None:
    """With GATEWAY_ADMIN_KEY set, /debug and /reload need it as a bearer token."""
    admin_key = request.app[SETTINGS].admin_key
    if not admin_key:
        return
    token = bearer_token(request.headers.get("Authorization")) or ""
    if not hmac.compare_digest(token.encode(), admin_key.encode()):
        raise APIError.unauthorized(
            "This endpoint needs the admin key: 'Authorization: Bearer <GATEWAY_ADMIN_KEY>'.",
            code="invalid_admin_key",
        )


async def health(request: web.Request) -> web.Response:
    record_of(request).family = "health"
    return web.json_response({"status": "ok"})


def _masked_url(url: URL) -> str:
    return str(url.with_password("***") if url.password else url)


def _masked_target(target: Target, backends: Backends, now: float) -> dict[str, Any]:
    return {
        "url": _masked_url(target.base_url),
        "apiKey": mask(target.api_key),
        "actualModelName": target.model,
        "headers": {name: mask(value) for name, value in target.headers.items()},
        "weight": target.weight,
        "maxConcurrent": target.max_concurrent,
        "resume": target.resume,
        "live": backends.state(target).as_dict(now),
    }


def _masked_config(snapshot: Snapshot, backends: Backends, dns: DnsDiscovery) -> dict[str, Any]:
    now = time.monotonic()
    endpoints = {}
    for model_id, route in snapshot.routes.items():
        route = dns.expand(route)  # the addresses serving it now
        endpoints[model_id] = {
            "displayName": route.display_name,
            "strategy": route.strategy,
            "retries": route.retries,
            "retryOn": sorted(route.retry_on),
            "queueTimeout": route.queue_timeout,
            "timeouts": route.timeouts.model_dump(by_alias=True),
            "healthCheck": route.health_check.model_dump(by_alias=True),
            "circuitBreaker": route.circuit_breaker.model_dump(by_alias=True),
            "maxResumes": route.max_resumes,
            "backends": [_masked_target(t, backends, now) for t in route.targets],
        }
    config = snapshot.config
    keys = [
        {
            "name": k.name,
            "key": k.key if k.key.startswith("sha256:") else mask(k.key),
            "models": k.models,
            "rpm": k.rpm,
            "tpm": k.tpm,
            "maxConcurrent": k.max_concurrent,
        }
        for k in config.keys
    ]
    return {
        "endpoints": endpoints,
        "keys": keys,
        "allowOrigins": list(config.allow_origins),
        "maxRequestBytes": config.max_request_bytes,
        "redisUrl": _masked_url(URL(config.redis_url)) if config.redis_url else None,
        "redisFailOpen": config.redis_fail_open,
    }


async def debug(request: web.Request) -> web.Response:
    record_of(request).family = "debug"
    _require_admin(request)
    store = request.app[STORE]
    snapshot = store.current
    return web.json_response(
        {
            "version": snapshot.version,
            "source": snapshot.source,
            "loadedAt": snapshot.loaded_at,
            "lastReload": store.last_reload.as_dict() if store.last_reload else None,
            "config": _masked_config(snapshot, request.app[BACKENDS], request.app[DNS]),
            "limits": request.app[LIMITER].status(),
            "routing": _routing(request.app, snapshot),
            "discovery": request.app[DNS].status(),
            "streamResumes": request.app[METRICS].stream_resume_counts(),
            # Under --workers each process answers for itself: this says which one did.
            "process": {"pid": os.getpid(), "worker": os.environ.get("GATEWAY_WORKER_INDEX")},
        }
    )


def _routing(app: web.Application, snapshot: Snapshot) -> dict[str, Any]:
    """Cache-aware routes, per backend: its index part, in-flight, scraped signals, age."""
    now = time.monotonic()
    out: dict[str, Any] = {}
    for model_id, route in snapshot.routes.items():
        if route.strategy == "cache-aware":
            policy = app[POLICIES].for_route(route)
            assert isinstance(policy, CacheAwarePolicy)
            out[model_id] = policy.describe(route, app[BACKENDS], now)
    return out


async def ready(request: web.Request) -> web.Response:
    """200 when every model has a backend that can take requests; 503 with the detail when
    not, or while the gateway drains before stopping (so load balancers move on)."""
    record_of(request).family = "ready"
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining"}, status=503)
    backends = request.app[BACKENDS]
    now = time.monotonic()
    models: dict[str, dict[str, str]] = {}
    unavailable = []
    dns = request.app[DNS]
    for model_id, route in request.app[STORE].current.routes.items():
        states = {t.label: backends.state(t).health(now) for t in dns.expand(route).targets}
        models[model_id] = states
        if all(state == "ejected" for state in states.values()):
            unavailable.append(model_id)
    limits = request.app[LIMITER].status()
    # Fail-open keeps serving without Redis (and says so here); fail-closed cannot serve keys.
    limits_down = limits.get("redis") == "down" and not limits["failOpen"]
    status = 503 if unavailable or limits_down else 200
    body = {
        "status": "unavailable" if status == 503 else "ready",
        "unavailable": unavailable,
        "limits": limits,
    }
    if dns.backends:  # a failed look-up keeps the last good addresses serving: shown, not 503
        body["discovery"] = dns.status()
    return web.json_response({**body, "models": models}, status=status)


async def reload(request: web.Request) -> web.Response:
    record_of(request).family = "reload"
    _require_admin(request)
    outcome = request.app[STORE].reload("api")
    if not outcome.ok:
        raise APIError.bad_request(
            "The config file is invalid; the previous config keeps serving. "
            + " ".join(f"{request.app[STORE].path}: {line}." for line in outcome.errors),
            code="invalid_config",
        )
    supervisor = os.environ.get("GATEWAY_SUPERVISOR_PID")
    if supervisor:
        # Under --workers this request reached one process: the supervisor passes the reload
        # on to every process as a SIGHUP (this one reloads again, which changes nothing).
        os.kill(int(supervisor), signal.SIGHUP)
    return web.json_response({"status": "reloaded", **outcome.as_dict()})


async def usage(request: web.Request) -> web.Response:
    """Requests and tokens per client key and model: summed over every gateway that shares
    the Redis when one is configured, else this process's since it started."""
    record_of(request).family = "usage"
    _require_admin(request)
    names = [key.name for key in request.app[STORE].current.config.keys]
    return web.json_response(await request.app[LIMITER].usage(names))


async def metrics(request: web.Request) -> web.Response:
    record_of(request).family = "metrics"
    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health, expect_handler=expect_continue)
    app.router.add_get("/ready", ready, expect_handler=expect_continue)
    app.router.add_get("/debug", debug, expect_handler=expect_continue)
    app.router.add_post("/reload", reload, expect_handler=expect_continue)
    app.router.add_get("/metrics", metrics, expect_handler=expect_continue)
    app.router.add_get("/usage", usage, expect_handler=expect_continue)
