"""Typed keys for what the app factory puts on the application object."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.metrics import Metrics
from gateway.redact import Redactor
from gateway.reload import ConfigStore


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
