"""Waiting on a condition (a counter, a state) instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from gateway.backends import BackendState
from gateway.state import BACKENDS


async def until(condition: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    """Return as soon as `condition()` holds; fail after `within` seconds (a hang guard,
    not a measurement: the condition normally holds long before)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what or condition}"
        await asyncio.sleep(0.02)


def state_of(app: web.Application, port: int) -> BackendState:
    """The gateway's live state of the backend listening on `port`."""
    return next(s for s in app[BACKENDS].states.values() if s.label.endswith(f":{port}"))


def health_of(app: web.Application, port: int) -> str:
    states = [s for s in app[BACKENDS].states.values() if s.label.endswith(f":{port}")]
    return states[0].health(time.monotonic()) if states else "unknown"


async def settled(counter: Callable[[], int], polls: int = 10, within: float = 30.0) -> int:
    """The counter's value once it has stopped moving for `polls` turns of the event loop's
    polling. Gateway and backends share this loop, so a counter that stands still while the
    loop keeps turning is blocked for real, not starved by a busy machine."""
    deadline = time.monotonic() + within
    value, still = counter(), 0
    while still < polls:
        assert time.monotonic() < deadline, f"never settled: {counter}"
        await asyncio.sleep(0.02)
        now = counter()
        still = still + 1 if now == value else 0
        value = now
    return value
