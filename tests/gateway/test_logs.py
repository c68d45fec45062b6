"""The log processor is the choke point for secrets: whatever reaches a log line is redacted."""

from __future__ import annotations

import json
import logging

import structlog

from gateway.logs import configure_logging
from gateway.redact import Redactor, mask

SECRET = "sk-abcdefghijklmnop-1234"


def test_structlog_and_stdlib_lines_are_redacted_and_json(capsys) -> None:
    configure_logging(Redactor([SECRET]), fmt="json")
    structlog.get_logger("t").info("calling backend", detail=f"Bearer {SECRET}")
    logging.getLogger("aiohttp.server").error("failed with key %s", SECRET)
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        structlog.get_logger("t").exception("unexpected")
    err = capsys.readouterr().err
    assert SECRET not in err
    lines = [json.loads(line) for line in err.splitlines()]
    assert lines[0]["detail"] == f"Bearer {mask(SECRET)}"
    assert lines[1]["event"] == f"failed with key {mask(SECRET)}"
    assert "boom sk-...1234" in lines[2]["exception"]


def test_mask() -> None:
    assert mask("sk-abcdefghijklmnop-1234") == "sk-...1234"
    assert mask("short") == "***"
    assert mask(None) is None
