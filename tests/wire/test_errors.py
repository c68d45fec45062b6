"""Each error constructor gives its status OpenAI's `type` and the headers the status needs."""

from __future__ import annotations

import json

import pytest

from wire.errors import APIError


def _sent(error: APIError) -> tuple[int, dict[str, object], dict[str, str]]:
    response = error.to_response()
    assert response.content_type == "application/json"
    assert response.body is not None
    return response.status, json.loads(bytes(response.body)), dict(response.headers)


@pytest.mark.parametrize(
    ("error", "status", "type_", "param", "code"),
    [
        (APIError.bad_request("m", code="c", param="p"), 400, "invalid_request_error", "p", "c"),
        (APIError.bad_request("m"), 400, "invalid_request_error", None, None),
        (APIError.unauthorized("m", code="c"), 401, "authentication_error", None, "c"),
        (
            APIError.unauthorized("m", code="c", type_="invalid_request_error"),
            401, "invalid_request_error", None, "c",
        ),
        (APIError.forbidden("m", code="c", param="model"), 403, "permission_error", "model", "c"),
        (APIError.not_found("m", code="c", param="model"), 404, "invalid_request_error", "model", "c"),
        (APIError.not_found("m", code="c", type_="not_found_error"), 404, "not_found_error", None, "c"),
        (APIError.too_large("m"), 413, "invalid_request_error", None, "request_too_large"),
        (APIError.rate_limited("m", retry_after=3), 429, "rate_limit_error", None, "rate_limit_exceeded"),
        (APIError.unavailable("m", code="c"), 503, "server_error", None, "c"),
        (APIError.unavailable("m", code="c", type_="rate_limit_error"), 503, "rate_limit_error", None, "c"),
        (APIError.internal("m"), 500, "server_error", None, "internal_error"),
        (APIError.upstream(504, "m", code="timeout_first_byte"), 504, "upstream_error", None, "timeout_first_byte"),
    ],
)  # fmt: skip
def test_each_family_has_its_status_and_type(
    error: APIError, status: int, type_: str, param: str | None, code: str | None
) -> None:
    sent_status, body, _ = _sent(error)
    assert sent_status == status
    assert body == {"error": {"message": "m", "type": type_, "param": param, "code": code}}


def test_a_401_always_carries_the_bearer_challenge() -> None:
    _, _, headers = _sent(APIError.unauthorized("m", code="c", headers={"X-A": "1"}))
    assert headers["WWW-Authenticate"] == "Bearer" and headers["X-A"] == "1"


def test_retry_after_is_sent_when_given() -> None:
    _, _, limited = _sent(APIError.rate_limited("m", retry_after=7, headers={"x-r": "2"}))
    assert limited["Retry-After"] == "7" and limited["x-r"] == "2"
    _, _, busy = _sent(APIError.unavailable("m", code="c", retry_after=2))
    assert busy["Retry-After"] == "2"
    _, _, down = _sent(APIError.upstream(503, "m", code="c", retry_after=1))
    assert down["Retry-After"] == "1"
    _, _, plain = _sent(APIError.unavailable("m", code="c"))
    assert "Retry-After" not in plain


def test_the_positional_constructor_still_works() -> None:
    error = APIError(418, "m", "invalid_request_error", "p", "c", {"X-A": "1"})
    assert _sent(error) == (
        418,
        {"error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": "c"}},
        {"Content-Type": "application/json", "X-A": "1"},
    )
