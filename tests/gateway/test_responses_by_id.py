"""Requests that name a Responses API object instead of a model (retrieve, delete, input
items, cancel) reach the backend that created it; an id the gateway never saw is a 404 in
OpenAI's shape. Driven by the real openai SDK against fake backends that keep responses."""

from __future__ import annotations

import itertools
import json
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.object_routes import ObjectRoute, ObjectRoutes
from tests.gateway.backend import FakeBackend, Received

ALICE = "sk-alice-0123456789"
BOB = "sk-bob-0123456789"


def keep_responses(backend: FakeBackend, name: str) -> dict[str, dict[str, Any]]:
    """The backend keeps what it created, as an OpenAI server does, and knows nothing else."""
    stored: dict[str, dict[str, Any]] = {}
    numbers = itertools.count(1)

    def response(model: str, status: str = "completed") -> dict[str, Any]:
        return {
            "id": f"resp_{name}_{next(numbers)}",
            "object": "response",
            "created_at": 1700000000,
            "model": model,
            "status": status,
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": f"from {name}", "annotations": []}],
                }
            ],
        }

    def not_found(object_id: str) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "message": f"no {object_id} on {name}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status=404,
        )

    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        parts = received.path.removeprefix("/v1/").split("/")
        if parts == ["responses"] and received.method == "POST":
            payload = received.json()
            created = response(payload["model"])
            stored[created["id"]] = created
            if not payload.get("stream"):
                return web.json_response(created)
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await stream.prepare(request)
            for number, (kind, body) in enumerate(
                [
                    ("response.created", {**created, "status": "in_progress", "output": []}),
                    ("response.completed", created),
                ]
            ):
                event = {"type": kind, "sequence_number": number, "response": body}
                await stream.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())
            return stream
        object_id = parts[1]
        if object_id not in stored:
            return not_found(object_id)
        if len(parts) == 2 and received.method == "GET":
            return web.json_response(stored[object_id])
        if len(parts) == 2 and received.method == "DELETE":
            del stored[object_id]
            return web.json_response({"id": object_id, "object": "response", "deleted": True})
        if parts[2:] == ["input_items"]:
            item = {
                "type": "message",
                "id": "msg_0",
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": "hi"}],
            }
            return web.json_response(
                {
                    "object": "list",
                    "data": [item],
                    "first_id": "msg_0",
                    "last_id": "msg_0",
                    "has_more": False,
                }
            )
        if parts[2:] == ["cancel"] and received.method == "POST":
            stored[object_id] = {**stored[object_id], "status": "cancelled"}
            return web.json_response(stored[object_id])
        return not_found(object_id)

    backend.handler = handler
    return stored


def config(*backends: FakeBackend, **extra: Any) -> dict[str, Any]:
    return {
        "endpoints": {
            "m": {
                "backends": [{"url": b.url, "actualModelName": "real"} for b in backends],
                "strategy": "weighted-round-robin",
            }
        },
        **extra,
    }


async def test_the_sdk_reaches_the_backend_that_created_each_response(
    make_gateway, make_backend
) -> None:
    first, second = await make_backend(), await make_backend()
    stores = keep_responses(first, "a"), keep_responses(second, "b")
    gw = await make_gateway(config(first, second))
    client = gw.openai()
    created = [await client.responses.create(model="m", input="hi") for _ in range(4)]
    assert {r.id.split("_")[1] for r in created} == {"a", "b"}  # both backends made some
    assert all(r.model == "m" for r in created)
    for made in created:
        got = await client.responses.retrieve(made.id)
        assert got.id == made.id and got.model == "m"
        items = await client.responses.input_items.list(made.id)
        assert [i.id for i in items.data] == ["msg_0"]
    cancelled = await client.responses.cancel(created[0].id)
    assert cancelled.status == "cancelled"
    for made in created:
        await client.responses.delete(made.id)
    assert stores == ({}, {})
    # Deleted: the gateway forgets the id, and answers as for one it never saw.
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.retrieve(created[0].id)
    assert caught.value.body["code"] == "not_found"


async def test_a_streamed_response_is_remembered_from_its_first_event(
    make_gateway, make_backend
) -> None:
    first, second = await make_backend(), await make_backend()
    keep_responses(first, "a"), keep_responses(second, "b")
    gw = await make_gateway(config(first, second))
    client = gw.openai()
    for _ in range(2):
        stream = await client.responses.create(model="m", input="hi", stream=True)
        events = [event async for event in stream]
        assert events[0].type == "response.created" and events[0].response.model == "m"
        got = await client.responses.retrieve(events[0].response.id)
        assert got.id == events[0].response.id and got.status == "completed"


async def test_an_id_never_seen_is_a_404_in_openais_shape(make_gateway, backend, http) -> None:
    keep_responses(backend, "a")
    gw = await make_gateway(config(backend))
    with pytest.raises(openai.NotFoundError):
        await gw.openai().responses.retrieve("resp_unknown")
    for method, path in [
        ("GET", "/v1/responses/resp_unknown"),
        ("DELETE", "/v1/responses/resp_unknown"),
        ("GET", "/v1/responses/resp_unknown/input_items"),
        ("POST", "/v1/responses/resp_unknown/cancel"),
    ]:
        async with http.request(method, gw.url + path) as response:
            assert response.status == 404, (method, path)
            assert await response.json() == {
                "error": {
                    "message": "No response with id 'resp_unknown' was created through this "
                    "gateway (or it has expired).",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_found",
                }
            }
    assert backend.received == []  # nothing was guessed at a backend


async def test_another_keys_response_is_not_found(make_gateway, backend) -> None:
    keep_responses(backend, "a")
    keys = [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}]
    gw = await make_gateway(config(backend, keys=keys))
    made = await gw.openai(api_key=ALICE).responses.create(model="m", input="hi")
    assert (await gw.openai(api_key=ALICE).responses.retrieve(made.id)).id == made.id
    with pytest.raises(openai.NotFoundError):
        await gw.openai(api_key=BOB).responses.retrieve(made.id)


async def test_gateways_sharing_redis_route_each_others_responses(
    make_gateway, make_backend, redis_server, tmp_path
) -> None:
    first, second = await make_backend(), await make_backend()
    keep_responses(first, "a"), keep_responses(second, "b")
    shared = config(first, second, redisUrl=redis_server.url)
    one = await make_gateway(shared, filename="one.json")
    other = await make_gateway(shared, filename="two.json")
    created = [await one.openai().responses.create(model="m", input="hi") for _ in range(2)]
    for made in created:
        assert (await other.openai().responses.retrieve(made.id)).id == made.id
    # Without the shared Redis the other gateway has never heard of them.
    alone = await make_gateway(config(first, second), filename="alone.json")
    with pytest.raises(openai.NotFoundError):
        await alone.openai().responses.retrieve(created[0].id)


async def test_the_memory_is_bounded_and_forgets_after_its_ttl() -> None:
    entry = ObjectRoute("m", "m", "http://b#0", None)
    routes = ObjectRoutes(capacity=2)
    for object_id in ("one", "two", "three"):
        await routes.remember(object_id, entry)
    assert await routes.recall("one") is None  # the least recently used went first
    assert await routes.recall("two") == entry and await routes.recall("three") == entry
    expired = ObjectRoutes(ttl=0.0)
    await expired.remember("one", entry)
    assert await expired.recall("one") is None
