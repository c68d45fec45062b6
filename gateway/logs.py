"""structlog setup: JSON when LOG_FORMAT=json or not a terminal, secrets redacted on every line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from gateway.redact import Redactor


def _redacting(redactor: Redactor) -> structlog.types.Processor:
    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = redactor.redact(value)
        return event

    return processor


def configure_logging(redactor: Redactor, fmt: str | None = None, level: str | None = None) -> None:
    """Route structlog and the stdlib loggers (aiohttp's included) through one renderer."""
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "").lower()
    as_json = fmt == "json" or (fmt != "console" and not sys.stderr.isatty())
    level_name = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        # Last before rendering, so exception text is redacted too.
        _redacting(redactor),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared[:-2],
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared[:-2],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redacting(redactor),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    # We write one access line per request ourselves.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
