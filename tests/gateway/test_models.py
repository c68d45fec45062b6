"""/v1/models: display names, config order, answered from memory even with every backend down."""

from __future__ import annotations

import openai
import pytest

DEAD = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there


async def test_lists_models_in_config_order_with_display_names(make_gateway) -> None:
    gw = await make_gateway(
        {
            "endpoints": {
                "zeta": {"url": DEAD, "displayName": "Zeta (GPU)"},
                "alpha": {"url": DEAD},
                "org/model-7b": {"url": DEAD, "displayName": "Seven B"},
            }
        }
    )
    page = await gw.openai().models.list()
    assert [m.id for m in page.data] == ["zeta", "alpha", "org/model-7b"]
    names = [m.model_extra["name"] for m in page.data]
    assert names == ["Zeta (GPU)", "alpha", "Seven B"]
    assert all(m.object == "model" and m.owned_by and m.created for m in page.data)


async def test_get_one_model_including_ids_with_slashes(make_gateway) -> None:
    gw = await make_gateway({"endpoints": {"org/model-7b": {"url": DEAD, "displayName": "7B"}}})
    model = await gw.openai().models.retrieve("org/model-7b")
    assert model.id == "org/model-7b"
    assert model.model_extra["name"] == "7B"
    with pytest.raises(openai.NotFoundError) as caught:
        await gw.openai().models.retrieve("nope")
    assert caught.value.body["code"] == "model_not_found"
    assert "org/model-7b" in caught.value.body["message"]


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
async def test_models_with_and_without_v1_prefix(make_gateway, http, path) -> None:
    gw = await make_gateway({"endpoints": {"a": {"url": DEAD}}})
    async with http.get(gw.url + path) as response:
        assert response.status == 200
        body = await response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a"]


async def test_unknown_route_is_an_openai_404(make_gateway, http) -> None:
    gw = await make_gateway({"endpoints": {"a": {"url": DEAD}}})
    async with http.get(gw.url + "/nothing/here") as response:
        assert response.status == 404
        body = await response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_request_without_model_under_v1_is_a_clear_400(make_gateway, http) -> None:
    gw = await make_gateway({"endpoints": {"a": {"url": DEAD}}})
    async with http.get(gw.url + "/v1/chat/completions") as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"]["code"] == "missing_model"
    assert body["error"]["param"] == "model"
