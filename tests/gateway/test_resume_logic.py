"""Stream resume's pure logic, without HTTP: what was streamed, what may be resumed, the
continuation request and the continuation's chunks as the client sees them."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.resume import (
    CHAT,
    COMPLETIONS,
    Splice,
    StreamSoFar,
    continuation,
    request_refusal,
    stream_refusal,
    tokens_left,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def _chat_chunk(delta: dict[str, Any], finish: str | None = None, **top: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 100,
        "model": "m",
        "system_fingerprint": "fp-a",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **top,
    }


def _streamed(*deltas: dict[str, Any]) -> StreamSoFar:
    so_far = StreamSoFar(chat=True)
    so_far.observe(_chat_chunk({"role": "assistant", "content": ""}))
    for delta in deltas:
        so_far.observe(_chat_chunk(delta))
    return so_far


def test_the_text_tokens_and_identity_streamed_so_far() -> None:
    so_far = _streamed({"content": "Hel"}, {"content": "lo"}, {"content": ""})
    assert so_far.text == "Hello"
    assert so_far.completion_tokens == 2
    assert so_far.identity == {"id": "chatcmpl-1", "created": 100, "system_fingerprint": "fp-a"}
    assert stream_refusal(so_far) is None


def test_completion_text_is_followed_too() -> None:
    so_far = StreamSoFar(chat=False)
    for text in ("a", "b", ""):
        so_far.observe({"id": "cmpl-1", "created": 5, "choices": [{"index": 0, "text": text}]})
    assert (so_far.text, so_far.completion_tokens) == ("ab", 2)
    assert so_far.identity == {"id": "cmpl-1", "created": 5}


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        ({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}, "tool_calls"),
        ({"function_call": {"name": "f"}}, "function_call_as_tool_calls"),
        ({"reasoning_content": "think"}, "reasoning"),
        ({"reasoning": "think"}, "reasoning"),
    ],
)
def test_tool_calls_and_reasoning_refuse(delta: dict[str, Any], reason: str) -> None:
    so_far = _streamed({"content": "x"}, delta)
    assert stream_refusal(so_far) == reason.replace("function_call_as_", "")


@pytest.mark.parametrize(
    ("tail", "body", "reason"),
    [
        ("embeddings", {"stream": True}, "endpoint"),
        (CHAT, {"messages": MESSAGES}, "not_a_stream"),
        (CHAT, {"messages": MESSAGES, "stream": True, "n": 2}, "n"),
        (CHAT, {"messages": MESSAGES, "stream": True, "logprobs": True}, "logprobs"),
        (CHAT, {"messages": MESSAGES, "stream": True, "top_logprobs": 2}, "logprobs"),
        (CHAT, {"messages": "hi", "stream": True}, "body"),
        (COMPLETIONS, {"prompt": "p", "stream": True, "logprobs": 0}, None),
        (COMPLETIONS, {"prompt": "p", "stream": True, "logprobs": 1}, "logprobs"),
        (COMPLETIONS, {"prompt": "p", "stream": True, "echo": True}, "echo"),
        (COMPLETIONS, {"prompt": "p", "stream": True, "best_of": 2}, "n"),
        (COMPLETIONS, {"prompt": [1, 2], "stream": True}, "prompt"),
        (COMPLETIONS, {"prompt": ["a", "b"], "stream": True}, "prompt"),
        (COMPLETIONS, {"prompt": ["a"], "stream": True}, None),
        (CHAT, {"messages": MESSAGES, "stream": True, "n": 1}, None),
        (CHAT, {"messages": MESSAGES, "stream": True, "n": None, "logprobs": False}, None),
    ],
)
def test_requests_that_can_never_be_resumed(
    tail: str, body: dict[str, Any], reason: str | None
) -> None:
    assert request_refusal(tail, body) == reason


def test_chat_continuation_carries_the_partial_message() -> None:
    original = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 10}
    body = continuation(CHAT, original, _streamed({"content": "Hel"}, {"content": "lo "}))
    assert body["messages"] == [*MESSAGES, {"role": "assistant", "content": "Hello "}]
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False
    assert body["max_tokens"] == 8
    assert original["max_tokens"] == 10 and len(original["messages"]) == 1  # untouched


def test_both_token_limits_are_reduced_and_the_smaller_is_what_is_left() -> None:
    original = {"messages": MESSAGES, "max_tokens": 10, "max_completion_tokens": 4}
    so_far = _streamed({"content": "a"})
    body = continuation(CHAT, original, so_far)
    assert (body["max_tokens"], body["max_completion_tokens"]) == (9, 3)
    assert tokens_left(original, so_far) == 3
    assert tokens_left({"messages": MESSAGES}, so_far) is None


def test_a_client_continuing_its_own_message_gets_the_text_appended() -> None:
    own = [*MESSAGES, {"role": "assistant", "content": "Once "}]
    original = {"messages": own, "continue_final_message": True, "add_generation_prompt": False}
    body = continuation(CHAT, original, _streamed({"content": "upon"}))
    assert body["messages"] == [*MESSAGES, {"role": "assistant", "content": "Once upon"}]
    parts = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]
    body = continuation(CHAT, {**original, "messages": parts}, _streamed({"content": "B"}))
    assert body["messages"][-1]["content"] == [
        {"type": "text", "text": "A"},
        {"type": "text", "text": "B"},
    ]


def test_nothing_streamed_but_the_role_sends_the_original_request() -> None:
    original = {"messages": MESSAGES, "stream": True}
    assert continuation(CHAT, original, _streamed()) == original


def test_completion_continuation_appends_the_text_to_the_prompt() -> None:
    so_far = StreamSoFar(chat=False)
    so_far.observe({"id": "c", "choices": [{"index": 0, "text": " world"}]})
    assert continuation(COMPLETIONS, {"prompt": "hello"}, so_far)["prompt"] == "hello world"
    assert continuation(COMPLETIONS, {"prompt": ["hello"]}, so_far)["prompt"] == ["hello world"]


def test_continuation_chunks_take_the_first_streams_identity_and_lose_the_role() -> None:
    splice = Splice(True, {"id": "chatcmpl-1", "created": 100, "system_fingerprint": "fp-a"}, 3)
    second = {"id": "chatcmpl-2", "created": 200, "system_fingerprint": "fp-b"}
    assert splice.chunk(_chat_chunk({"role": "assistant", "content": ""}, **second)) is None
    chunk = splice.chunk({**_chat_chunk({"content": "x"}), **second})
    assert (chunk["id"], chunk["created"], chunk["system_fingerprint"]) == (
        "chatcmpl-1",
        100,
        "fp-a",
    )
    assert chunk["choices"][0]["delta"] == {"content": "x"}
    with_role = splice.chunk({**_chat_chunk({"role": "assistant", "content": "y"}), **second})
    assert with_role["choices"][0]["delta"] == {"content": "y"}
    finish = splice.chunk(_chat_chunk({}, "stop"))
    assert finish["choices"][0]["finish_reason"] == "stop"


def test_a_fingerprint_the_first_stream_lacked_is_dropped() -> None:
    splice = Splice(False, {"id": "cmpl-1", "created": 1}, 0)
    chunk = splice.chunk({"id": "cmpl-2", "created": 2, "system_fingerprint": "fp", "choices": []})
    assert chunk == {"id": "cmpl-1", "created": 1, "choices": []}


def test_usage_is_the_original_prompt_and_every_parts_completion() -> None:
    # The continuation's prompt held the 3 tokens streamed before the seam.
    splice = Splice(True, {"id": "chatcmpl-1", "created": 100}, 3)
    usage = {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}
    chunk = splice.chunk({"id": "x", "choices": [], "usage": usage})
    assert chunk["usage"] == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}
    assert chunk["id"] == "chatcmpl-1"
