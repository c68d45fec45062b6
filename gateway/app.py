"""build_app(): wiring only — state, routes, middlewares, startup and cleanup."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gateway.admission import AdmissionControl
from gateway.backends import Backends
from gateway.background import background
from gateway.catalog import Catalog
from gateway.discovery import run_discovery
from gateway.dns_discovery import DnsDiscovery, run_dns_discovery
from gateway.handlers import admin, openai
from gateway.health import run_health_checks
from gateway.logs import configure_logging
from gateway.metrics import Metrics
from gateway.middleware import access_middleware, add_response_headers
from gateway.object_routes import ObjectRoutes, close_client
from gateway.redact import Redactor
from gateway.reload import ConfigStore, ReloadOutcome, run_watcher
from gateway.routing import Snapshot
from gateway.scrapes import run_scrapes
from gateway.selection import Policies
from gateway.state import (
    BACKENDS,
    CATALOG,
    CLOSING,
    DNS,
    DRAINING,
    LIMITER,
    METRICS,
    OBJECTS,
    POLICIES,
    REDACTOR,
    SESSION,
    SETTINGS,
    STARTED,
    STORE,
    TRACER,
    USAGE_LOG,
    Settings,
)
from gateway.tracing import RequestTracer
from gateway.upstream import make_session
from gateway.usagelog import UsageLog
from wire.tracing import start_tracing


def build_app(
    config_path: str | Path,
    settings: Settings | None = None,
    *,
    watch: bool = True,
    configure_logs: bool = True,
) -> web.Application:
    """The gateway application. Raises ConfigError if the file cannot be used."""
    settings = settings or Settings()
    store = ConfigStore(config_path)
    metrics = Metrics(store.current.routes)
    backends = Backends()
    for target in store.current.targets().values():
        backends.state(target)
    metrics.watch_backends(backends, lambda: store.current.routes)
    dns = DnsDiscovery(metrics.registry)
    dns.configure(store.current)
    redactor = Redactor(store.current.secrets())
    if settings.admin_key:
        redactor.add([settings.admin_key])
    if configure_logs:
        configure_logging(redactor)

    limits = AdmissionControl(
        on_redis_state=metrics.set_redis_up, on_redis_error=metrics.redis_errors.inc
    )
    # Closing a replaced Redis client is async; the reload that replaced it is not.
    closing: set[asyncio.Task[None]] = set()
    objects = ObjectRoutes(on_redis_error=metrics.redis_errors.inc)
    _use_redis(limits, objects, store.current, closing)

    def on_reload(outcome: ReloadOutcome, snapshot: Snapshot) -> None:
        metrics.reloads.labels("ok" if outcome.ok else "error", outcome.trigger).inc()
        metrics.last_reload_ok.set(1 if outcome.ok else 0)
        if outcome.ok:
            redactor.add(snapshot.secrets())
            _use_redis(limits, objects, snapshot, closing)
            metrics.set_models(snapshot.routes)
            dns.configure(snapshot)
            backends.retain(set(snapshot.targets()) | dns.target_keys())
            for target in snapshot.targets().values():
                backends.state(target)

    store.subscribe(on_reload)
    usage_log = UsageLog(
        on_error=lambda reason, lines: metrics.usage_log_errors.labels(reason).inc(lines)
    )
    # Off (None) unless an OTLP endpoint is set in the environment.
    tracing = start_tracing("llm-gateway", metrics.count_dropped_spans)

    app = web.Application(
        middlewares=[
            # Request id, CORS, error envelope, access line and metrics, in one layer.
            access_middleware(metrics, usage_log, lambda: store.current.config.usage_log),
        ],
        # The proxy reads bodies itself against the config's maxRequestBytes.
        client_max_size=2**63,
    )
    app[STORE] = store
    app[METRICS] = metrics
    app[REDACTOR] = redactor
    app[SETTINGS] = settings
    app[BACKENDS] = backends
    app[POLICIES] = Policies()
    app[DRAINING] = asyncio.Event()
    app[CATALOG] = Catalog()
    app[LIMITER] = limits
    app[CLOSING] = closing
    app[DNS] = dns
    app[STARTED] = int(time.time())  # `created` of every model card
    app[USAGE_LOG] = usage_log
    app[OBJECTS] = objects
    app.on_response_prepare.append(add_response_headers)
    app.on_cleanup.append(lambda _: _close(usage_log))
    app.on_cleanup.append(lambda _: limits.close())
    app.on_cleanup.append(lambda _: objects.close())
    app[TRACER] = None if tracing is None else RequestTracer(tracing)
    if tracing is not None:
        app.on_cleanup.append(lambda _: tracing.close())
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(background(run_health_checks))
    app.cleanup_ctx.append(background(run_discovery))
    app.cleanup_ctx.append(background(run_scrapes))
    app.cleanup_ctx.append(background(lambda app: run_dns_discovery(dns, backends, store)))
    if metrics.multiprocess:
        app.cleanup_ctx.append(background(_sync_metrics))
    if watch:
        app.cleanup_ctx.append(background(_watch_config))
    admin.add_routes(app)
    openai.add_routes(app)
    return app


async def _close(usage_log: UsageLog) -> None:
    await asyncio.to_thread(usage_log.close)  # it waits for the writer: not on the loop


def _use_redis(
    limits: AdmissionControl,
    objects: ObjectRoutes,
    snapshot: Snapshot,
    closing: set[asyncio.Task[None]],
) -> None:
    config = snapshot.config
    replaced = limits.configure(config.redis_url, config.redis_fail_open)
    replaced_client = objects.configure(config.redis_url)
    # The reload named another Redis: the old clients close in the background.
    for closed in (
        None if replaced is None else replaced.close(),
        None if replaced_client is None else close_client(replaced_client),
    ):
        if closed is not None:
            task = asyncio.get_running_loop().create_task(closed)
            closing.add(task)
            task.add_done_callback(closing.discard)


async def _sync_metrics(app: web.Application) -> None:
    """Under --workers, a scrape served by a sibling sees this process's backends too."""
    while True:
        app[METRICS].sync()
        await asyncio.sleep(1.0)


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    async with make_session() as session:
        app[SESSION] = session
        yield


async def _watch_config(app: web.Application) -> None:
    await run_watcher(app[STORE])
