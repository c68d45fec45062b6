"""/debug shows the live config and backend states with every secret masked."""

from __future__ import annotations

import json

from tests.gateway.configs import KEY, config


async def test_debug_masks_every_secret(make_gateway, backend, http) -> None:
    cfg = config(backend)
    cfg["endpoints"]["other"] = {
        "url": "http://user:hunter2-password@127.0.0.1:9/v1",
        "apiKey": "short",
    }
    gw = await make_gateway(cfg)
    async with http.get(gw.url + "/debug") as response:
        assert response.status == 200
        text = await response.text()
    for secret in (KEY, "tok-9876543210-secret", "hunter2-password", '"short"'):
        assert secret not in text
    debug = json.loads(text)
    (llama,) = debug["config"]["endpoints"]["llama"]["backends"]
    assert llama["apiKey"] == "sk-...cdef"
    assert llama["actualModelName"] == "real"
    assert llama["live"]["state"] == "healthy"
    assert debug["config"]["endpoints"]["other"]["backends"][0]["apiKey"] == "***"
    assert debug["version"] == 1
    assert debug["source"] == str(gw.config_path)
    assert debug["loadedAt"] > 0
    assert debug["lastReload"] is None
