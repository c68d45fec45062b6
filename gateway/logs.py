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

    pre_chain: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *pre_chain,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    # One formatter renders structlog's events and the stdlib's (aiohttp's) alike, so the
    # redaction below is the single place every line passes through.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redacting(redactor),  # after format_exc_info, so tracebacks are redacted too
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    # We write one access line per request ourselves, and a line per reload.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
