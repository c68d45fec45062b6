"""CLI: python -m worker --model PATH|demo [--served-model-name NAME] [--host H] [--port P]."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aiohttp import web

from worker import logs
from worker.app import build_app
from worker.settings import parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logs.configure()
    app = build_app(settings)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
