"""The access line's fast path writes exactly what the structlog path writes, redacted alike."""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import structlog

from gateway.logs import configure_logging, fast_json_handler, render_json
from gateway.metrics import Metrics
from gateway.middleware import Meters, RequestRecord, _finish
from gateway.redact import Redactor, mask
from wire.headers import new_request_id

SECRET = "sk-abcdefghijklmnop-1234"


def _record(**extra: object) -> RequestRecord:
    record = RequestRecord(request_id="req-1", family="chat.completions", **extra)  # type: ignore[arg-type]
    record.started -= 0.25
    return record


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _both_paths(capsys, record: RequestRecord, status: int) -> tuple[str, str]:
    request = SimpleNamespace(method="POST", path=f"/v1/chat/{SECRET}/x")
    meters = Meters(Metrics(["llama"]))
    structlog.contextvars.bind_contextvars(request_id=record.request_id, worker="w1")
    try:
        assert fast_json_handler(logging.getLogger("gateway.access")) is not None
        _finish(request, record, status, meters)  # type: ignore[arg-type]
        # Any filter on the root logger sends the line through structlog instead.
        root = logging.getLogger()
        keep = logging.Filter()
        root.addFilter(keep)
        try:
            assert fast_json_handler(logging.getLogger("gateway.access")) is None
            _finish(request, record, status, meters)  # type: ignore[arg-type]
        finally:
            root.removeFilter(keep)
    finally:
        structlog.contextvars.unbind_contextvars("request_id", "worker")
    fast, slow = _lines(capsys)
    return fast, slow


def _without_time(line: str) -> tuple[list[str], dict[str, object]]:
    data = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", data.pop("timestamp"))
    assert data["duration_ms"] >= 250  # the two lines are written at different times
    data["duration_ms"] = None
    return list(data), data


def test_fast_access_line_is_the_structlog_line(capsys) -> None:
    configure_logging(Redactor([SECRET]), fmt="json", level="INFO")
    record = _record(
        model=f"llama {SECRET} é",
        route_id="llama",
        backend="127.0.0.1:1",
        upstream_model="real",
        upstream_status=200,
        prompt_tokens=3,
        completion_tokens=0,
        key="team-a",
        error="died",
        attempts=2,
        failures=["refused", "died"],
    )
    record.first_byte_at = record.started + 0.1
    record.streamed = True
    fast, slow = _both_paths(capsys, record, 200)
    assert SECRET not in fast and SECRET not in slow
    assert _without_time(fast) == _without_time(slow)
    keys, data = _without_time(fast)
    assert data["model"] == f"llama {mask(SECRET)} é"
    assert data["request_id"] == "req-1" and data["worker"] == "w1"
    assert data["logger"] == "gateway.access" and data["level"] == "info"
    assert keys[0] == "method" and keys[-2:] == ["level", "logger"]


def test_fast_access_line_with_nothing_set(capsys) -> None:
    configure_logging(Redactor([SECRET]), fmt="json", level="INFO")
    fast, slow = _both_paths(capsys, _record(), 499)
    assert _without_time(fast) == _without_time(slow)


def test_quiet_routes_follow_the_level(capsys) -> None:
    configure_logging(Redactor([]), fmt="json", level="INFO")
    record = _record()
    record.family = "health"
    request = SimpleNamespace(method="GET", path="/health")
    _finish(request, record, 200, Meters(Metrics()))  # type: ignore[arg-type]
    assert _lines(capsys) == []
    configure_logging(Redactor([]), fmt="json", level="DEBUG")
    _finish(request, record, 200, Meters(Metrics()))  # type: ignore[arg-type]
    (line,) = _lines(capsys)
    assert json.loads(line)["level"] == "debug"


def test_render_json_falls_back_where_orjson_cannot() -> None:
    big = 2**70
    assert json.loads(render_json({"n": big, "s": "\ud800"[:0] + "x"})) == {"n": big, "s": "x"}
    assert json.loads(render_json({"s": "a\ud800b"})) == {"s": "a\ud800b"}
    assert render_json({"a": 1, "b": [None, True]}) == '{"a":1,"b":[null,true]}'


def test_request_ids_are_uuid4_hex() -> None:
    import uuid

    for _ in range(200):
        made = new_request_id()
        assert uuid.UUID(made).version == 4 and uuid.UUID(made).hex == made


def test_secrets_that_json_escapes_are_redacted_field_by_field(capsys) -> None:
    # The fast path searches the rendered line once; a secret with a quote, a backslash or a
    # non-ASCII character is written differently there, so such a redactor goes field by field.
    for secret in ('sk-"quoted"-1234567', "sk-back\\slash-1234", "sk-é-accented-1234"):
        redactor = Redactor([secret])
        assert not redactor.json_verbatim
        configure_logging(redactor, fmt="json", level="INFO")
        record = _record(model=f"m {secret}", route_id="m")
        fast, slow = _both_paths(capsys, record, 200)
        assert secret not in json.loads(fast)["model"] and secret not in json.loads(slow)["model"]
        assert _without_time(fast) == _without_time(slow)
    assert Redactor([SECRET]).json_verbatim
