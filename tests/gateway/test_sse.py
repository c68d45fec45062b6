"""The SSE splitter and event rewriting, under every way the network can cut a stream."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from gateway.rewrite import rewrite_event
from wire.sse import EventTooLarge, SSESplitter

EVENTS = [
    b"data: " + json.dumps({"model": "real", "n": i, "text": "\u00e9\u4e2d"}).encode() + b"\n\n"
    for i in range(5)
]
STREAM = b": comment\n\n" + b"".join(EVENTS) + b"data: [DONE]\r\n\r\n"


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_any_chunking_yields_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    splitter = SSESplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    assert events == [b": comment\n\n", *EVENTS, b"data: [DONE]\r\n\r\n"]
    assert splitter.pending == b""


def test_partial_event_is_pending() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b'data: {"a"') == []
    assert splitter.pending == b'data: {"a"'


def test_limit_on_a_never_ending_event() -> None:
    splitter = SSESplitter(max_event_bytes=1000)
    try:
        for _ in range(20):
            splitter.feed(b"x" * 100)
    except EventTooLarge:
        return
    raise AssertionError("no limit")


def test_rewrite_keeps_everything_but_the_model() -> None:
    event = b'id: 7\nevent: delta\ndata: {"model": "real", "x": [1, 2.5, "\\u00e9"]}\n\n'
    out = rewrite_event(event, "public")
    assert out.data.startswith(b"id: 7\nevent: delta\ndata: ")
    assert out.data.endswith(b"\n\n") and not out.data.endswith(b"\n\n\n")
    assert json.loads(out.data.split(b"data: ")[1]) == {"model": "public", "x": [1, 2.5, "\u00e9"]}


def test_rewrite_leaves_events_without_model_byte_for_byte() -> None:
    for event in (
        b'data: {"choices": []}\n\n',
        b": ping\n\n",
        b"data: [DONE]\n\n",
        b"data: {bad\n\n",
    ):
        assert rewrite_event(event, "public").data == event
