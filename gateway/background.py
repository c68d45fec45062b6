"""Tasks that live as long as the app: one way to run them, and the one clock they poll on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

TICK = 0.5  # seconds between a polling task's looks at what is due

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def background(job: Callable[[web.Application], Awaitable[None]]) -> CleanupContext:
    """A cleanup context running `job` from startup (after the contexts before it, such as
    the client session) until cleanup, when it is cancelled."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(job(app))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
