"""Stop strings cut exactly (and never leak into a stream); max_tokens ends with `length`."""

from __future__ import annotations

import openai

PROMPT = "def fibonacci(n):"
NO_EOS = {"ignore_eos": True}


async def _reference(client: openai.AsyncOpenAI, max_tokens: int = 60) -> str:
    resp = await client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body=NO_EOS
    )
    return resp.choices[0].text


def _stop_from(text: str) -> str:
    """A stop string from the middle of `text`, whose first occurrence is there."""
    start = len(text) // 2
    for length in (5, 4, 3, 2):
        candidate = text[start : start + length]
        if candidate.strip() and len(candidate) == length:
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


async def test_stop_string_cuts_exactly(client: openai.AsyncOpenAI) -> None:
    text = await _reference(client)
    stop = _stop_from(text)
    resp = await client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop], extra_body=NO_EOS
    )
    assert resp.choices[0].text == text[: text.index(stop)]
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens < 60


async def test_stop_string_never_leaks_into_a_stream(client: openai.AsyncOpenAI) -> None:
    text = await _reference(client)
    stop = _stop_from(text)
    stream = await client.completions.create(
        model="demo",
        prompt=PROMPT,
        max_tokens=60,
        temperature=0,
        stop=["never-appears-xyz", stop],
        stream=True,
        extra_body=NO_EOS,
    )
    chunks = [c async for c in stream]
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == text[: text.index(stop)]
    assert stop not in streamed
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_stop_string(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me something"}]
    whole = await client.chat.completions.create(
        model="demo", messages=messages, max_tokens=40, temperature=0, extra_body=NO_EOS
    )
    text = whole.choices[0].message.content or ""
    stop = _stop_from(text)
    cut = await client.chat.completions.create(
        model="demo", messages=messages, max_tokens=40, temperature=0, stop=stop, extra_body=NO_EOS
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


async def test_max_tokens_gives_finish_reason_length(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "go on"}],
        max_tokens=7,
        temperature=0.7,
        extra_body=NO_EOS,
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 7


async def test_max_completion_tokens_is_honoured(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "go on"}],
        max_completion_tokens=3,
        temperature=0,
        extra_body=NO_EOS,
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 3


async def test_default_max_tokens_is_the_rest_of_the_context(client: openai.AsyncOpenAI) -> None:
    # The main test worker runs with --max-model-len 512.
    resp = await client.completions.create(
        model="demo", prompt=PROMPT, temperature=0, extra_body=NO_EOS
    )
    assert resp.usage is not None
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == 512
    assert resp.choices[0].finish_reason == "length"
