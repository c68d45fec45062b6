"""The SSE splitter and event rewriting, under every way the network can cut a stream."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from gateway.rewrite import rewrite_event
from wire.sse import EVENT_END, EventTooLarge, SSESplitter, event_end, event_ended

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


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
_json = st.recursive(
    _json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(["model", "content", "x", "response"]), children, max_size=3
        ),
    ),
    max_leaves=8,
)


@given(
    prefix=st.dictionaries(
        st.sampled_from(["id", "object", "created", "system_fingerprint"]),
        st.one_of(st.text(max_size=10), st.integers(), st.none()),
        max_size=4,
    ),
    model=st.text(max_size=20),
    rest=st.dictionaries(
        st.sampled_from(["choices", "usage", "extra", "response", "model_info"]), _json, max_size=3
    ),
    compact=st.booleans(),
    public=st.text(min_size=1, max_size=10),
)
def test_fast_path_rewrites_exactly_like_a_full_parse(prefix, model, rest, compact, public) -> None:
    """Whatever the chunk holds (quotes, escapes, unicode, nested `model` keys, usage),
    the in-place rewrite gives the same JSON as parsing and re-encoding it."""
    payload = {**prefix, "model": model, **{k: v for k, v in rest.items() if k not in prefix}}
    separators = (",", ":") if compact else (", ", ": ")
    event = b"data: " + json.dumps(payload, separators=separators).encode() + b"\n\n"
    out = rewrite_event(event, public)
    assert out.data.endswith(b"\n\n") and out.data.count(b"\n") == 2
    expected = json.loads(json.dumps(payload))
    expected["model"] = public
    if isinstance(expected.get("response"), dict) and isinstance(
        expected["response"].get("model"), str
    ):
        expected["response"]["model"] = public
    assert json.loads(out.data[6:]) == expected
    usage = payload.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        assert out.payload is not None  # usage events are parsed, so tokens are counted


@given(
    st.lists(st.sampled_from([b"\n", b"\r", b"x", b"\r\n", b"\n\n"]), max_size=30).map(b"".join),
    st.integers(min_value=0, max_value=40),
)
def test_event_end_finds_what_the_terminator_pattern_finds(data: bytes, start: int) -> None:
    match = EVENT_END.search(data, start)
    assert event_end(data, start) == (-1 if match is None else match.end())
    assert event_end(bytearray(data), start) == event_end(data, start)
    assert event_ended(data, start) is (match is not None)


@given(st.lists(st.sampled_from([b"\n", b"\r", b"x", b"\r\n", b"data: 1"]), max_size=40))
def test_split_events_end_where_the_terminator_pattern_ends_them(pieces: list[bytes]) -> None:
    """Fed piece by piece (the buffered path, as soon as a piece holds a CR), the events
    are the pattern's leftmost matches, one after another."""
    stream = b"".join(pieces)
    splitter = SSESplitter()
    events = [event for piece in pieces for event in splitter.feed(piece)]
    expected, start = [], 0
    while (match := EVENT_END.search(stream, start)) is not None:
        expected.append(stream[start : match.end()])
        start = match.end()
    assert events == expected
    assert splitter.pending == stream[start:]
