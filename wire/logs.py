"""The structlog setup both servers share: JSON lines when LOG_FORMAT=json or stderr is not a
terminal, readable lines on one; library logs (aiohttp's) through the same renderer."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

import structlog

# What every line carries, structlog's and the stdlib's alike, in this order.
PRE_CHAIN: tuple[structlog.types.Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
)


def wants_json(fmt: str | None = None) -> bool:
    """`fmt` (else LOG_FORMAT) is `json`, or it is not `console` and stderr is no terminal."""
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "").lower()
    return fmt == "json" or (fmt != "console" and not sys.stderr.isatty())


def configure(
    as_json: bool,
    level: str | None = None,
    *,
    processors: Sequence[structlog.types.Processor] = (),
    handler: logging.Handler | None = None,
    serializer: Callable[..., str] = json.dumps,
) -> logging.Handler:
    """Route structlog and the stdlib's loggers through one formatter on the root logger's
    only handler (a StreamHandler on stderr unless given), and return that handler.

    `processors` run on every line after tracebacks are formatted, before it is rendered (the
    gateway's redaction); `serializer` renders JSON lines. The level is `level`, else
    LOG_LEVEL, else INFO."""
    level_name = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=serializer)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *PRE_CHAIN,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a reconfiguration (tests, a second app in one process) takes effect on
        # loggers made before it.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=list(PRE_CHAIN),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            *processors,
            renderer,
        ],
    )
    handler = handler or logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    # Both servers write one access line per request themselves, with the request id.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler
