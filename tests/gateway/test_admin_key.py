"""The admin key guards /debug and /reload; the public API and /health stay open."""

from __future__ import annotations

from gateway.state import Settings
from tests.gateway.configs import config


async def test_admin_key_guards_debug_and_reload(make_gateway, backend, http) -> None:
    gw = await make_gateway(config(backend), Settings(admin_key="admin-key-for-tests-123"))
    for method, path in (("GET", "/debug"), ("POST", "/reload")):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "admin-key-for-tests-123"},
        ):
            async with http.request(method, gw.url + path, headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]["type"] == "authentication_error"
        good = {"Authorization": "Bearer admin-key-for-tests-123"}
        async with http.request(method, gw.url + path, headers=good) as response:
            assert response.status == 200
    # the public API and health stay open
    async with http.get(gw.url + "/health") as response:
        assert response.status == 200
