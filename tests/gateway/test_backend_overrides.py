"""A backend's own actualModelName and apiKey override its endpoint's."""

from __future__ import annotations

from tests.gateway.backend import answering


async def test_per_backend_model_name_and_key(make_gateway, make_backend) -> None:
    a, b = await make_backend(), await make_backend()
    cfg = {
        "endpoints": {
            "m": {
                "actualModelName": "default-name",
                "apiKey": "sk-endpoint-default-key",
                "strategy": "priority",
                "backends": [
                    {"url": a.url, "actualModelName": "a-name", "apiKey": "sk-backend-a-key-0"},
                    {"url": b.url},
                ],
            }
        }
    }
    gw = await make_gateway(cfg)
    await gw.openai().chat.completions.create(model="m", messages=[])
    a.handler = answering(503)
    completion = await gw.openai().chat.completions.create(model="m", messages=[])
    assert completion.model == "m"
    assert a.received[0].json()["model"] == "a-name"
    assert a.received[0].headers["Authorization"] == "Bearer sk-backend-a-key-0"
    assert b.received[0].json()["model"] == "default-name"
    assert b.received[0].headers["Authorization"] == "Bearer sk-endpoint-default-key"
