"""structlog setup: JSON lines in production (or LOG_FORMAT=json), readable on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str | None = None) -> None:
    level_name = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    fmt = os.environ.get("LOG_FORMAT")
    as_json = fmt == "json" or (fmt != "console" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_logger_name,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Library logs (aiohttp, transformers) go through the same renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    # aiohttp's own access log would duplicate ours (and carries no request id).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # transformers' batching logger brings its own plain-text handler; give it ours.
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    cb_logger.handlers[:] = [handler]
    cb_logger.propagate = False
    if as_json:
        # Progress bars are noise in JSON logs.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
