"""Typed keys for what the app factory puts on the application object."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.admission import AdmissionControl
from gateway.backends import Backends
from gateway.catalog import Catalog
from gateway.config import env_value
from gateway.dns_discovery import DnsDiscovery
from gateway.metrics import Metrics
from gateway.object_routes import ObjectRoutes
from gateway.redact import Redactor
from gateway.reload import ConfigStore
from gateway.selection import Policies
from gateway.tracing import RequestTracer
from gateway.usagelog import UsageLog

_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings from the environment; unlike the config file, not reloadable."""

    admin_key: str | None = None
    allow_origins: tuple[str, ...] | None = None  # None: take the config file's
    # Token streams relayed from the backend connection's data callback (see
    # gateway.transport_relay); off: every stream takes relay._pump_events.
    transport_relay: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        origins = env_value(env, "ALLOW_ORIGINS")
        relay = (env_value(env, "GATEWAY_TRANSPORT_RELAY") or "on").strip().lower()
        if relay not in _SWITCH:
            raise ValueError(f"GATEWAY_TRANSPORT_RELAY must be on or off, not {relay!r}")
        return cls(
            admin_key=env_value(env, "GATEWAY_ADMIN_KEY"),
            allow_origins=None
            if origins is None
            else tuple(o.strip() for o in origins.split(",") if o.strip()),
            transport_relay=_SWITCH[relay],
        )


STORE = web.AppKey("store", ConfigStore)
METRICS = web.AppKey("metrics", Metrics)
REDACTOR = web.AppKey("redactor", Redactor)
SETTINGS = web.AppKey("settings", Settings)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BACKENDS = web.AppKey("backends", Backends)
POLICIES = web.AppKey("policies", Policies)
# Set when SIGTERM starts the drain: /ready answers 503 while in-flight requests finish.
DRAINING = web.AppKey("draining", asyncio.Event)
CATALOG = web.AppKey("catalog", Catalog)
LIMITER = web.AppKey("limiter", AdmissionControl)
# When the app was built (epoch seconds): the `created` of every model card.
STARTED = web.AppKey("started", int)
USAGE_LOG = web.AppKey("usage_log", UsageLog)
# Which backend created each Responses API object, for requests that name one.
OBJECTS = web.AppKey("objects", ObjectRoutes)
# Replaced Redis clients being closed: held here so their tasks are not collected midway.
CLOSING = web.AppKey("closing", set)
# The request tracer, or None while tracing is off (no OTLP endpoint configured).
TRACER: web.AppKey[RequestTracer | None] = web.AppKey("tracer")
DNS = web.AppKey("dns", DnsDiscovery)
