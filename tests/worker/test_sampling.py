"""Sampling parameters: greedy determinism, batch invariance, seeds, top-k, penalties."""

from __future__ import annotations

import asyncio

import openai

PROMPTS = [
    "def add(a, b):",
    "The quick brown fox",
    "import numpy as np\n",
    "Once upon a time",
    "SELECT * FROM users WHERE",
    "<html><body>",
    "for (int i = 0; i < n; i++) {",
    "Dear Sir or Madam,",
]


async def _complete(client: openai.AsyncOpenAI, prompt: str, **kw: object) -> str:
    resp = await client.completions.create(
        model="demo", prompt=prompt, max_tokens=kw.pop("max_tokens", 24), **kw
    )
    return resp.choices[0].text


async def test_greedy_is_deterministic(client: openai.AsyncOpenAI) -> None:
    first = await _complete(client, PROMPTS[0], temperature=0)
    second = await _complete(client, PROMPTS[0], temperature=0)
    assert first == second and first


async def test_greedy_output_is_the_same_alone_and_inside_a_batch(
    client: openai.AsyncOpenAI,
) -> None:
    alone = [await _complete(client, p, temperature=0, max_tokens=32) for p in PROMPTS]
    batched = await asyncio.gather(
        *(_complete(client, p, temperature=0, max_tokens=32) for p in PROMPTS)
    )
    assert batched == alone
    assert len(set(alone)) > 1  # different prompts really did produce different text


async def test_seed_makes_sampling_reproducible(client: openai.AsyncOpenAI) -> None:
    kw = {"temperature": 1.0, "seed": 1234, "max_tokens": 24}
    first = await _complete(client, "Random words:", **kw)
    # Alone and beside other sampled requests: a seed is per request, not per batch.
    crowd = await asyncio.gather(
        _complete(client, "Random words:", **kw),
        *(_complete(client, p, temperature=1.0, max_tokens=24) for p in PROMPTS[:4]),
    )
    assert crowd[0] == first
    other = await _complete(client, "Random words:", **{**kw, "seed": 99})
    assert other != first


async def test_temperature_above_zero_samples(client: openai.AsyncOpenAI) -> None:
    outs = {await _complete(client, "Random words:", temperature=1.5) for _ in range(3)}
    assert len(outs) > 1


async def test_top_k_one_is_greedy(client: openai.AsyncOpenAI) -> None:
    greedy = await _complete(client, PROMPTS[1], temperature=0)
    top1 = await _complete(client, PROMPTS[1], temperature=1.5, extra_body={"top_k": 1})
    assert top1 == greedy


async def test_tiny_top_p_is_greedy(client: openai.AsyncOpenAI) -> None:
    greedy = await _complete(client, PROMPTS[2], temperature=0)
    nucleus = await _complete(client, PROMPTS[2], temperature=1.0, top_p=1e-6)
    assert nucleus == greedy


async def test_frequency_penalty_breaks_repetition(
    client: openai.AsyncOpenAI, demo_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    # The random demo model loops on a few tokens when greedy; a strong penalty must
    # push it to new ones.
    kw = {"temperature": 0, "max_tokens": 40, "extra_body": {"ignore_eos": True}}
    plain = await _complete(client, PROMPTS[3], **kw)
    penalized = await _complete(client, PROMPTS[3], frequency_penalty=2.0, **kw)
    presence = await _complete(client, PROMPTS[3], presence_penalty=2.0, **kw)
    distinct = [len(set(demo_tokenizer.encode(t))) for t in (plain, penalized, presence)]
    assert distinct[1] > distinct[0]
    assert distinct[2] > distinct[0]


async def test_greedy_output_survives_a_full_kv_cache(client: openai.AsyncOpenAI) -> None:
    # 10 x 250 tokens need more than the main worker's 2048-token cache: the manager must
    # evict and later recompute some sequences, and their text must not change.
    kw = {"temperature": 0, "max_tokens": 250, "extra_body": {"ignore_eos": True}}
    prompts = [f"{p} #{i}" for i, p in enumerate(PROMPTS + PROMPTS[:2])]
    alone = [await _complete(client, p, **dict(kw)) for p in prompts[:2]]
    crowded = await asyncio.gather(*(_complete(client, p, **dict(kw)) for p in prompts))
    assert crowded[:2] == alone


async def test_n_choices_are_seeded_apart_and_reproducible(client: openai.AsyncOpenAI) -> None:
    kw = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Name three colours"}],
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 42,
        "n": 3,
    }
    first = await client.chat.completions.create(**kw)  # type: ignore[call-overload]
    again = await client.chat.completions.create(**kw)  # type: ignore[call-overload]
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert [c.message.content for c in again.choices] == texts
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens == 3 * (await _prompt_len(client, kw["messages"]))

    stream = await client.chat.completions.create(**kw, stream=True)  # type: ignore[call-overload]
    streamed = ["", "", ""]
    roles = set()
    async for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.add(choice.index)
    assert streamed == texts
    assert roles == {0, 1, 2}


async def _prompt_len(client: openai.AsyncOpenAI, messages: object) -> int:
    resp = await client.chat.completions.create(
        model="demo",
        messages=messages,
        max_tokens=1,  # type: ignore[arg-type]
    )
    assert resp.usage is not None
    return resp.usage.prompt_tokens
