"""The worker's real answers validate against OpenAI's published OpenAPI spec: bodies, every
streamed chunk, model cards and lists, embeddings and errors. Where OpenAI's API contradicts
its spec, the API is followed and the test names the one place."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import pytest

from tests.openai_spec import check, component, or_null, response_schema, schema_with
from tests.worker.conftest import WorkerProcess
from wire.sse import DONE_EVENT, SSESplitter

ERROR = component("ErrorResponse")
# OpenAI's API streams completions as the completion object with `finish_reason: null` until
# a choice ends, and (with `include_usage`) `usage: null` until the last chunk, as its chat
# chunks do. The spec gives that object for stream chunks but allows null in neither place.
COMPLETION_CHUNK = schema_with(
    "CreateCompletionResponse",
    ["properties", "choices", "items", "properties", "finish_reason"],
    or_null,
)
COMPLETION_CHUNK["properties"]["usage"] = or_null(COMPLETION_CHUNK["properties"]["usage"])
# With `encoding_format: "base64"` (the openai SDK's default) OpenAI's API answers each
# embedding as a base64 string; the spec allows only an array of numbers.
BASE64_EMBEDDINGS = schema_with(
    "CreateEmbeddingResponse",
    ["properties", "data", "items"],
    lambda _: schema_with(
        "Embedding",
        ["properties", "embedding"],
        lambda floats: {"anyOf": [floats, {"type": "string"}]},
    ),
)


@pytest.fixture
async def http(worker: WorkerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(worker.base_url + "/", headers=worker.headers) as session:
        yield session


async def _post(http: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> Any:
    async with http.post(path, json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _events(http: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> list[Any]:
    """The JSON of every `data:` event of a stream, which must end in [DONE]."""
    splitter = SSESplitter()
    events: list[bytes] = []
    async with http.post(path, json={**body, "stream": True}) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        async for chunk in response.content.iter_any():
            events += splitter.feed(chunk)
    assert events and events[-1] == DONE_EVENT
    return [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
COMPLETION = {"model": "demo", "prompt": "Once upon", "max_tokens": 5}
USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


async def test_chat_completion_matches_the_spec(http: aiohttp.ClientSession) -> None:
    body = await _post(http, "chat/completions", {**CHAT, "n": 2})
    check(response_schema("/chat/completions", "post"), body)
    assert [c["message"]["refusal"] for c in body["choices"]] == [None, None]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream_chunks_match_the_spec(
    http: aiohttp.ClientSession, include_usage: bool
) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = await _events(http, "chat/completions", {**CHAT, "n": 2, **options})
    schema = response_schema("/chat/completions", "post", "text/event-stream")
    for chunk in chunks:
        check(schema, chunk)
    assert ("usage" in chunks[-1]) is include_usage


async def test_completion_matches_the_spec(http: aiohttp.ClientSession) -> None:
    body = await _post(http, "completions", {**COMPLETION, "n": 2})
    check(response_schema("/completions", "post"), body)


@pytest.mark.parametrize("include_usage", [False, True])
async def test_completion_stream_chunks_match_the_api(
    http: aiohttp.ClientSession, include_usage: bool
) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = await _events(http, "completions", {**COMPLETION, **options})
    for chunk in chunks:
        check(COMPLETION_CHUNK, chunk)
    # The departures from the spec, pinned so the exception stays as narrow as it is: the
    # nulls alone break it.
    spec = response_schema("/completions", "post")
    unfinished = next(c for c in chunks if c["choices"] and not c["choices"][0]["finish_reason"])
    with pytest.raises(jsonschema.ValidationError, match="None is not of type 'string'"):
        check(spec, unfinished)
    for chunk in chunks:
        choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
        usage = {"usage": chunk["usage"] or USAGE} if include_usage else {}
        check(spec, {**chunk, "choices": choices, **usage})
    if include_usage:
        assert [c["usage"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]


async def test_model_list_and_cards_match_the_spec(http: aiohttp.ClientSession) -> None:
    async with http.get("models") as response:
        listing = await response.json()
    check(response_schema("/models", "get"), listing)
    assert [m["id"] for m in listing["data"]] == ["demo", "all-MiniLM-L6-v2"]
    for card in listing["data"]:
        async with http.get(f"models/{card['id']}") as response:
            assert response.status == 200
            one = await response.json()
        check(response_schema("/models/{model}", "get"), one)
        assert one == card


async def test_an_unknown_model_card_is_openais_404(http: aiohttp.ClientSession) -> None:
    async with http.get("models/gpt-nope") as response:
        assert response.status == 404
        body = await response.json()
    check(ERROR, body)
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"
    assert body["error"]["type"] == "invalid_request_error"
    assert "demo" in body["error"]["message"]


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_embeddings_match_the_spec(http: aiohttp.ClientSession, encoding: str) -> None:
    request = {"model": "all-MiniLM-L6-v2", "input": ["a", "b"], "encoding_format": encoding}
    body = await _post(http, "embeddings", request)
    if encoding == "float":
        check(response_schema("/embeddings", "post"), body)
    else:
        check(BASE64_EMBEDDINGS, body)
        with pytest.raises(jsonschema.ValidationError, match="is not of type 'array'"):
            check(response_schema("/embeddings", "post"), body)


async def test_errors_match_the_spec(worker: WorkerProcess, http: aiohttp.ClientSession) -> None:
    async with http.post("chat/completions", data=b"{not json") as response:
        assert response.status == 400
        check(ERROR, await response.json())
    async with http.post("chat/completions", json={**CHAT, "temperature": 9}) as response:
        assert response.status == 400
        check(ERROR, await response.json())
    async with http.get("no/such/route") as response:
        assert response.status == 404
        check(ERROR, await response.json())
    async with (
        aiohttp.ClientSession() as anonymous,
        anonymous.get(worker.base_url + "/models") as response,
    ):
        assert response.status == 401
        check(ERROR, await response.json())
