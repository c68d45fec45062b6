"""CLI: python -m worker --model PATH|demo [--served-model-name NAME] [--host H] [--port P]."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from worker import logs
from worker.app import build_app
from worker.settings import parse_settings
from worker.state import STATE


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logs.configure()
    app = build_app(settings)
    try:
        # handler_cancellation: a client that hangs up cancels its handler, which cancels its
        # generation, for non-streaming requests too (they write nothing until the end).
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            handler_cancellation=True,
            access_log=None,
            print=None,
        )
    except GracefulExit:
        pass  # a second signal arrived while the first one's shutdown was running
    finally:
        # Ctrl-C reaches the whole process group and a supervisor may add a SIGTERM: the
        # second signal cuts aiohttp's cleanup short, and the generation thread is not a
        # daemon, so stop it here or the process never exits.
        engine = app[STATE].engine
        if engine is not None:
            # The loop is closed: a further Ctrl-C would interrupt the stop half-way.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
