"""Chat and text completions through the openai SDK, streaming and not."""

from __future__ import annotations

import json

import aiohttp
import openai

from tests.worker.conftest import WorkerProcess

GREEDY = {"temperature": 0}


async def test_chat_completion_has_openai_shape_and_usage(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, **GREEDY
    )
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "demo"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 3
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


async def test_chat_prompt_goes_through_the_chat_template(
    client: openai.AsyncOpenAI, worker: WorkerProcess
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    async with aiohttp.ClientSession(headers=worker.headers) as http:
        async with http.post(
            f"{worker.base_url}/tokenize", json={"model": "demo", "messages": messages}
        ) as r:
            templated = await r.json()
        async with http.post(
            f"{worker.base_url}/detokenize", json={"model": "demo", "tokens": templated["tokens"]}
        ) as r:
            text = (await r.json())["prompt"]
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    resp = await client.chat.completions.create(
        model="demo", messages=messages, max_tokens=2, **GREEDY
    )
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == templated["count"]


async def test_chat_stream_chunks_end_with_done(worker: WorkerProcess) -> None:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Stream please"}],
        "max_tokens": 6,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with (
        aiohttp.ClientSession(headers=worker.headers) as http,
        http.post(f"{worker.base_url}/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        raw = (await r.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "usage" not in chunks[0]  # only present when include_usage is asked for


async def test_chat_stream_text_equals_non_stream_text(client: openai.AsyncOpenAI) -> None:
    # Long enough that multi-byte characters split across tokens are certain to occur.
    messages = [{"role": "user", "content": "Écris: café, naïve, 你好, 🙂"}]
    whole = await client.chat.completions.create(
        model="demo", messages=messages, max_tokens=120, **GREEDY
    )
    stream = await client.chat.completions.create(
        model="demo", messages=messages, max_tokens=120, stream=True, **GREEDY
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == whole.choices[0].message.content
    assert all("\ufffd" not in p for p in parts[:-1])


async def test_include_usage_adds_a_final_usage_chunk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5


async def test_text_completion_stream_and_not(client: openai.AsyncOpenAI) -> None:
    whole = await client.completions.create(
        model="demo", prompt="def main():", max_tokens=12, **GREEDY
    )
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens <= 12
    stream = await client.completions.create(
        model="demo",
        prompt="def main():",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage == whole.usage


async def test_completion_of_several_prompts_gives_one_choice_each(
    client: openai.AsyncOpenAI,
) -> None:
    prompts = ["import os", "class Foo:", "for i in range(10):"]
    batch = await client.completions.create(model="demo", prompt=prompts, max_tokens=6, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, batch.choices, strict=True):
        alone = await client.completions.create(model="demo", prompt=prompt, max_tokens=6, **GREEDY)
        assert choice.text == alone.choices[0].text


async def test_several_prompts_stream_interleaved_by_index(client: openai.AsyncOpenAI) -> None:
    prompts = ["import os", "class Foo:", "for i in range(10):"]
    whole = await client.completions.create(model="demo", prompt=prompts, max_tokens=8, **GREEDY)
    stream = await client.completions.create(
        model="demo",
        prompt=prompts,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    texts = ["", "", ""]
    reasons: list[str | None] = [None, None, None]
    chunks = [c async for c in stream]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage == whole.usage


async def test_prompt_as_token_ids(client: openai.AsyncOpenAI, demo_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = demo_tokenizer.encode("import sys")
    by_ids = await client.completions.create(model="demo", prompt=ids, max_tokens=5, **GREEDY)
    by_text = await client.completions.create(
        model="demo", prompt="import sys", max_tokens=5, **GREEDY
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
