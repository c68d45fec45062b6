"""Typed keys for what the app factory puts on the application object."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.admission import AdmissionControl
from gateway.backends import Backends
from gateway.catalog import Catalog
from gateway.metrics import Metrics
from gateway.redact import Redactor
from gateway.reload import ConfigStore
from gateway.selection import Policies


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings from the environment; unlike the config file, not reloadable."""

    admin_key: str | None = None
    allow_origins: tuple[str, ...] | None = None  # None: take the config file's


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
# Replaced Redis clients being closed: held here so their tasks are not collected midway.
CLOSING = web.AppKey("closing", set)
