"""structlog setup: JSON when LOG_FORMAT=json or not a terminal, secrets redacted on every line."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from gateway.redact import Redactor
from wire import logs as shared_logging
from wire.logs import wants_json

# Types orjson would render on its own but json (and so structlog's fallback) renders with
# repr(): passed to `default`, so both serialisers write the same thing.
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def render_json(event: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
    """One compact JSON line: orjson, or json where orjson cannot (integers beyond 64 bits,
    lone surrogates). Non-finite floats come out as null (valid JSON), not as NaN."""
    try:
        return orjson.dumps(event, default=default, option=_ORJSON_OPTIONS).decode()
    except (TypeError, ValueError):
        return json.dumps(event, default=default, separators=(",", ":"))


def _redacting(redactor: Redactor) -> structlog.types.Processor:
    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = redactor.redact(value)
        return event

    return processor


class _Timestamps:
    """What structlog's TimeStamper(fmt="iso", utc=True) writes (`isoformat()`: microseconds
    unless they are 0), with the date and time formatted once per second: `datetime.now`
    and `isoformat` cost more than the rest of the access line's bookkeeping."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1  # the last whole second formatted, and its text
        self._text = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        micro = int((now - second) * 1_000_000)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{micro:06d}Z" if micro else self._text + "Z"


class JsonLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The JSON log handler, with a direct way in for the per-request access line.

    `write_event` renders an event dict the way the processor chain would (same keys, same
    order, same redaction, same serialiser) without going through structlog's and the stdlib's
    layers: the access line is written once per request, and those layers cost more than the
    rest of the request's bookkeeping together."""

    def __init__(self, stream: Any, redactor: Redactor) -> None:
        super().__init__(stream)
        self.redactor = redactor
        self._timestamps = _Timestamps()

    def write_event(self, logger: str, level: str, event: dict[str, Any]) -> None:
        event["level"] = level
        event["logger"] = logger
        event["timestamp"] = self._timestamps.now()
        redactor = self.redactor
        line = render_json(event)
        # One search of the rendered line, when no secret is written differently in JSON
        # than in its string (quotes, backslashes, control characters): a secret in a value
        # is then in the line as it is. Only a line with one is redacted field by field.
        if not redactor.json_verbatim or redactor.redact(line) != line:
            redact = redactor.redact
            for key, value in event.items():
                if isinstance(value, str):
                    event[key] = redact(value)
            line = render_json(event)
        line += self.terminator
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write(line)
                self.flush()
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": event.get("event")}))


def fast_json_handler(logger: logging.Logger) -> JsonLineHandler | None:
    """The handler `logger`'s lines end up in, when that is only the JSON handler configured
    here (no other handler, filter or level in the way); else None and the caller logs through
    structlog as usual."""
    root = logging.root
    if logger.handlers or logger.filters or not logger.propagate or logger.parent is not root:
        return None
    handlers = root.handlers
    if len(handlers) != 1 or root.filters:
        return None
    handler = handlers[0]
    if handler.__class__ is not JsonLineHandler or handler.filters:
        return None
    return handler


def configure_logging(redactor: Redactor, fmt: str | None = None, level: str | None = None) -> None:
    """wire.logs' setup, with every line redacted: after tracebacks are formatted, so they
    are redacted too. The one formatter renders structlog's events and the stdlib's
    (aiohttp's) alike, so the redaction is the single place every line passes through."""
    as_json = wants_json(fmt)
    shared_logging.configure(
        as_json,
        level,
        processors=[_redacting(redactor)],
        handler=JsonLineHandler(sys.stderr, redactor) if as_json else None,
        serializer=render_json,
    )
    # A line per reload is ours to write.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
