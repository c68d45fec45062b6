"""Bad input gets a 400 in OpenAI's error shape, naming the parameter and the numbers."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.worker.conftest import WorkerProcess

USER = [{"role": "user", "content": "hi"}]


async def _post(worker: WorkerProcess, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(headers=worker.headers) as http:
        kwargs = {"data": body} if isinstance(body, str) else {"json": body}
        async with http.post(f"{worker.base_url}{path}", **kwargs) as r:
            return r.status, await r.json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_bad_chat_parameters_are_400(
    worker: WorkerProcess, body: dict[str, Any], param: str
) -> None:
    status, payload = await _post(
        worker, "/chat/completions", {"model": "demo", "messages": USER, **body}
    )
    assert status == 400, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_negative_temperature_through_the_sdk(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="demo", messages=USER, temperature=-1)
    assert err.value.status_code == 400
    assert "temperature" in err.value.message
    assert "-1" in err.value.message


async def test_prompt_longer_than_the_context_is_400_with_the_numbers(
    client: openai.AsyncOpenAI, demo_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    prompt = "hello world " * 400
    n = len(demo_tokenizer.encode(prompt))
    assert n > 512
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="demo", prompt=prompt, max_tokens=5)
    message = err.value.message
    assert "512" in message and str(n) in message
    body: Any = err.value.body
    assert body["code"] == "context_length_exceeded"


async def test_prompt_plus_max_tokens_over_the_context_is_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="demo", messages=USER, max_tokens=600)
    assert "512" in err.value.message and "600" in err.value.message
    body: Any = err.value.body
    assert body["param"] == "max_tokens"


async def test_unknown_model_is_400_naming_the_served_one(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert "gpt-4o" in err.value.message and "demo" in err.value.message
    body: Any = err.value.body
    assert body["code"] == "model_not_found"


async def test_invalid_json_and_wrong_types_are_400(worker: WorkerProcess) -> None:
    status, payload = await _post(worker, "/completions", "{not json")
    assert status == 400 and payload["error"]["code"] == "invalid_json"
    status, payload = await _post(worker, "/completions", ["a list"])
    assert status == 400
    status, payload = await _post(worker, "/completions", {"model": "demo", "prompt": {"x": 1}})
    assert status == 400 and payload["error"]["param"].startswith("prompt")
    status, payload = await _post(worker, "/completions", {"model": "demo", "prompt": [10**9]})
    assert status == 400 and payload["error"]["param"] == "prompt"


async def test_unsupported_completion_options_are_400(worker: WorkerProcess) -> None:
    for extra, param in [
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
    ]:
        status, payload = await _post(
            worker, "/completions", {"model": "demo", "prompt": "a", **extra}
        )
        assert status == 400 and payload["error"]["param"] == param


async def test_unknown_route_and_method_are_openai_shaped(worker: WorkerProcess) -> None:
    async with aiohttp.ClientSession(headers=worker.headers) as http:
        async with http.get(f"{worker.base_url}/nothing-here") as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "not_found_error"
        async with http.get(f"{worker.base_url}/chat/completions") as r:
            assert r.status == 405
            assert "error" in await r.json()
