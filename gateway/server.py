"""Running the app on a socket: the runner settings shared by the CLI and the tests."""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from gateway.state import DRAINING, STORE
from wire.protocol_errors import answer_protocol_errors_in_json

log = structlog.get_logger("gateway.server")


DEFAULT_DRAIN_TIMEOUT = 30.0


async def start(
    app: web.Application,
    host: str,
    port: int,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    *,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Start serving; the bound port is in `runner.addresses`. On cleanup the runner stops
    listening, then lets in-flight requests (streams included) finish for `drain_timeout`."""
    # handler_cancellation: a client that goes away cancels its handler, which closes the
    # backend connection, which stops the backend generating for nobody.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=drain_timeout
    )
    await runner.setup()
    answer_protocol_errors_in_json(runner)
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]


async def serve_forever(
    app: web.Application,
    host: str,
    port: int,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    *,
    reuse_port: bool = False,
) -> None:
    """Serve until SIGINT/SIGTERM, then drain; SIGHUP reloads the config."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: app[STORE].reload("sighup"))
    runner = await start(app, host, port, drain_timeout, reuse_port=reuse_port)
    log.info(
        "gateway listening",
        host=host,
        port=bound_port(runner),
        models=list(app[STORE].current.routes),
        config=str(app[STORE].path),
    )
    try:
        await stop.wait()
    finally:
        app[DRAINING].set()
        log.info("gateway draining", drain_timeout_s=drain_timeout)
        await runner.cleanup()
        log.info("gateway stopped")
