"""The worker reads the bearer key and the client's request id by the gateway's rules."""

from __future__ import annotations

import aiohttp
import pytest

from tests.worker.conftest import API_KEY, WorkerProcess


@pytest.mark.parametrize(
    "header", [f"bearer {API_KEY}", f"BEARER  {API_KEY}", f"Bearer\t{API_KEY}"]
)
async def test_the_bearer_scheme_is_case_insensitive(worker: WorkerProcess, header: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{worker.base_url}/models", headers={"Authorization": header}) as r,
    ):
        assert r.status == 200


@pytest.mark.parametrize(
    "header", [None, "Bearer", f"Basic {API_KEY}", f"Bearer {API_KEY}x", API_KEY]
)
async def test_a_missing_or_wrong_key_is_refused_with_a_challenge(
    worker: WorkerProcess, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{worker.base_url}/models", headers=headers) as r,
    ):
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == "Bearer"
        error = (await r.json())["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"


@pytest.mark.parametrize("given", ["has space", "x" * 129, "ünïcode", 'a"b'])
async def test_an_unsafe_client_request_id_is_replaced(worker: WorkerProcess, given: str) -> None:
    async with (
        aiohttp.ClientSession(headers=worker.headers) as http,
        http.get(f"{worker.base_url}/models", headers={"X-Request-ID": given}) as r,
    ):
        assert r.status == 200
        made = r.headers["X-Request-ID"]
    assert made != given and len(made) == 32
    assert given not in worker.log_text()
