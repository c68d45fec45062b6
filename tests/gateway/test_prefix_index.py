"""The prefix index: what it keys on, how it matches, and that its memory stays bounded."""

from __future__ import annotations

import random
import tracemalloc

from gateway.prefix_index import (
    CHARS_PER_TOKEN,
    DEFAULT_CACHE_TOKENS,
    BackendPart,
    PrefixIndex,
    block_chars,
    block_hashes,
    request_text,
)


def chat(*turns: tuple[str, str], tools: list[dict] | None = None) -> dict:
    body: dict = {"messages": [{"role": r, "content": c} for r, c in turns]}
    if tools:
        body["tools"] = tools
    return body


SYSTEM = "You are a careful assistant. " * 20


def test_the_key_is_every_message_in_order_not_only_the_first() -> None:
    a = request_text(chat(("system", SYSTEM), ("user", "x" * 600)))
    b = request_text(chat(("system", SYSTEM), ("user", "y" * 600)))
    assert a is not None and b is not None
    ha, hb = block_hashes(a, "m"), block_hashes(b, "m")
    shared = sum(1 for x, y in zip(ha, hb, strict=False) if x == y)
    assert 0 < shared < len(ha)  # the system prompt is shared, the user turns are not
    assert block_chars(shared) <= len(SYSTEM) + 16


def test_roles_tools_and_multimodal_text_are_part_of_the_key() -> None:
    same = request_text(chat(("user", "hello " * 40)))
    as_system = request_text(chat(("system", "hello " * 40)))
    assert block_hashes(same or "", "m")[0] != block_hashes(as_system or "", "m")[0]
    tool = [{"type": "function", "function": {"name": "f" * 80}}]
    with_tools = request_text(chat(("user", "hello " * 40), tools=tool))
    assert with_tools is not None and "f" * 80 in with_tools
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "please"},
                ],
            }
        ]
    }
    text = request_text(parts)
    assert text is not None and "describe" in text and "please" in text and "AAAA" not in text
    assert request_text({"prompt": "once upon a time"}) == "once upon a time"
    assert request_text({"input": "embed me"}) is None


def test_the_model_seeds_the_hashes() -> None:
    text = "z" * 640
    assert set(block_hashes(text, "a")).isdisjoint(block_hashes(text, "b"))


def test_a_part_matches_the_longest_prefix_it_was_given() -> None:
    part = BackendPart(1_000_000)
    first = block_hashes("q" * 4000, "m")
    part.add(first)
    longer = block_hashes("q" * 4000 + "r" * 4000, "m")
    assert part.matched(longer) == len(first)
    assert part.matched(block_hashes("r" * 4000, "m")) == 0


def test_eviction_takes_the_oldest_conversations_and_their_tails_first() -> None:
    part = BackendPart(capacity_tokens=4096)
    old = block_hashes("o" * 8000, "m")
    part.add(old)
    for i in range(6):
        part.add(block_hashes(str(i) * 8000, "m"))
    assert part.matched(old) == 0
    assert part.tokens <= 4096 * 1.25
    recent = block_hashes("5" * 8000, "m")
    assert part.matched(recent) > 0


def test_reload_keeps_the_parts_of_backends_still_there() -> None:
    index = PrefixIndex()
    index.part("a", 10_000).add(block_hashes("a" * 1000, "m"))
    index.part("b", 10_000).add(block_hashes("b" * 1000, "m"))
    index.retain(["a", "c"])
    assert set(index.parts) == {"a"} and len(index.parts["a"]) > 0


def test_memory_stays_bounded_under_a_long_random_workload() -> None:
    """The README's bound: 10,000 live conversations of 8k tokens, every one of them kept
    (four backends with caches big enough to hold them all), fit in 50 MB; and with caches
    of the default size, more traffic does not grow the index."""
    rng = random.Random(7)
    index = PrefixIndex()
    blocks_per_conversation = len(block_hashes("c" * 8192 * CHARS_PER_TOKEN, "m"))
    capacity = 10_000 * 8192 // 4 * 2
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(10_000):
            key = f"backend-{rng.randrange(4)}"
            hashes = [rng.getrandbits(60) for _ in range(blocks_per_conversation)]
            index.part(key, capacity).add(hashes)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert sum(len(p) for p in index.parts.values()) == 10_000 * blocks_per_conversation
    print(used)
    assert used <= 50 * 1024 * 1024, used

    bounded = PrefixIndex()
    sizes = []
    for conversation in range(20_000):
        part = bounded.part(f"backend-{rng.randrange(4)}", DEFAULT_CACHE_TOKENS)
        part.add([rng.getrandbits(60) for _ in range(blocks_per_conversation)])
        if conversation % 5_000 == 4_999:
            sizes.append(sum(len(p) for p in bounded.parts.values()))
    assert max(sizes) <= min(sizes) * 1.3  # flat: traffic does not grow it
    for part in bounded.parts.values():
        assert part.tokens <= DEFAULT_CACHE_TOKENS * 1.25
