"""The bearer token and the request id are read by one rule in both servers (wire/headers.py)."""

from __future__ import annotations

import pytest

from wire.headers import accept_request_id, bearer_token, new_request_id


@pytest.mark.parametrize(
    "header",
    ["Bearer sk-1", "bearer sk-1", "BEARER sk-1", "Bearer   sk-1", "Bearer\tsk-1", " Bearer sk-1 "],
)
def test_the_scheme_is_case_insensitive_and_whitespace_is_no_part_of_the_token(
    header: str,
) -> None:
    assert bearer_token(header) == "sk-1"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic c2stMQ==", "sk-1"])
def test_no_bearer_token_is_none(header: str | None) -> None:
    assert bearer_token(header) is None


@pytest.mark.parametrize("given", ["req-abc-123", "a", "x" * 128, "trace:span.1_2"])
def test_a_safe_client_request_id_is_kept(given: str) -> None:
    assert accept_request_id(given) == given


@pytest.mark.parametrize("given", [None, "", "x" * 129, "has space", "new\nline", 'quote"', "é"])
def test_an_unsafe_client_request_id_is_replaced(given: str | None) -> None:
    made = accept_request_id(given)
    assert made != given
    assert len(made) == 32 and int(made, 16) >= 0


def test_new_request_ids_are_uuid4_hex() -> None:
    import uuid

    made = {new_request_id() for _ in range(100)}
    assert len(made) == 100
    assert all(uuid.UUID(hex=m).version == 4 for m in made)
