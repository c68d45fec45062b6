"""The byte-level model rewrites give exactly what parsing and re-encoding gives, whatever
the document: escaped keys, duplicate keys, nested `model` members, huge integers, NaN."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.relay import _cut_usage, _without_usage
from gateway.request_body import RequestBody
from gateway.rewrite import (
    ModelSwap,
    _rewrite_event_slowly,
    loads,
    rewrite_event,
    rewrite_json_body,
    set_response_model,
    splice_models,
    usage_of,
)
from wire.sse import SSESplitter

_keys = st.sampled_from(
    ["model", "response", "usage", "choices", "prompt_tokens", "x", 'x"model', "mo\\del", "é"]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.integers(min_value=-(2**70), max_value=-(2**63) + 2),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["real-model", 'quo"te', "back\\slash", "\u2028", "é"]),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=10,
)
_documents = st.dictionaries(_keys, _values, max_size=5)


@st.composite
def _encoded(draw: st.DrawFn, document: Any) -> bytes:
    """`document` as some client or backend might write it."""
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
    text = json.dumps(document, separators=separators, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):  # some keys written with an escape: "mod\u0065l"
        text = re.sub(
            r'"model"(?=\s*:)', lambda _: draw(st.sampled_from(['"model"', '"mod\\u0065l"'])), text
        )
    if draw(st.booleans()):  # a duplicate key: the last one wins
        text = text[:-1] + ("," if len(text) > 2 else "") + '"model":"dup"}'
    return text.encode()


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON, NaN included."""
    return json.dumps(a) == json.dumps(b)


def _reference(data: bytes, public: str) -> Any:
    payload = json.loads(data)
    set_response_model(payload, public)
    return payload


@settings(max_examples=400, deadline=None)
@given(data=st.data(), document=_documents, public=st.sampled_from(["public", 'p"q', "p\\q", "é"]))
@example(data=None, document=None, public="public")
def test_event_rewrite_matches_a_parse(data: Any, document: Any, public: str) -> None:
    if data is None:  # the usual chunk
        raw = b'{"id":"c1","object":"chat.completion.chunk","model":"real-model","choices":[]}'
    else:
        raw = data.draw(_encoded({"model": "real-model", **document}))
    event = b"data: " + raw + b"\n\n"
    fast = rewrite_event(event, public)
    slow = _rewrite_event_slowly(event, public)
    assert fast.payload is not None and slow.payload is not None  # not a [DONE]
    assert fast.data.endswith(b"\n\n") and fast.data.startswith(b"data: ")
    assert _same(json.loads(fast.data[6:-2]), json.loads(slow.data[6:-2]))
    assert _same(json.loads(fast.data[6:-2]), _reference(raw, public))
    assert usage_of(fast.payload, fast.source) == usage_of(slow.payload)
    assert _same(fast.exact_payload(public), slow.payload)
    # The relay's per-stream path gives the same bytes, or leaves the event to rewrite_event;
    # where `usage` is, its key is in the bytes (the relay only looks for it there).
    swapped = ModelSwap(public).event(event)
    if swapped is not None:
        assert swapped[0] == fast.data and swapped[2] == fast.source
        assert _same(swapped[1], fast.payload)
    done = rewrite_event(b"data: [DONE]\n\n", public)
    assert ModelSwap(public).event(b"data: [DONE]\n\n") == (done.data, done.payload, done.source)
    if usage_of(fast.payload, fast.source) is not None:
        assert b'"usage"' in raw or b"\\" in raw


@settings(max_examples=300, deadline=None)
@given(data=st.data(), document=_documents, public=st.sampled_from(["public", 'p"q', "é"]))
def test_json_body_rewrite_matches_a_parse(data: Any, document: Any, public: str) -> None:
    raw = data.draw(_encoded({"model": "real-model", **document}))
    out = rewrite_json_body(raw, public)
    assert _same(json.loads(out.body), _reference(raw, public))
    payload = json.loads(raw)
    assert out.upstream_model == (
        payload["model"] if isinstance(payload.get("model"), str) else None
    )
    assert out.usage == usage_of(payload)


def _body(raw: bytes) -> RequestBody:
    request = SimpleNamespace(headers={"Content-Type": "application/json"})
    return RequestBody(request.headers["Content-Type"], raw)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    document=_documents,
    upstream=st.sampled_from(["upstream/m", 'u"q', "u\\q", "é", "client"]),
    ask_usage=st.booleans(),
)
def test_request_body_rewrite_matches_a_parse(
    data: Any, document: Any, upstream: str, ask_usage: bool
) -> None:
    document.pop("stream_options", None)
    raw = data.draw(_encoded({"model": "client", "stream": True, **document}))
    model = json.loads(raw).get("model")
    if not isinstance(model, str) or not model:
        return  # refused with a 400 before any rewrite
    body = _body(raw)
    hop = SimpleNamespace(upstream_model=upstream)
    out = body.for_hop(hop, ask_usage)  # type: ignore[arg-type]
    expected = json.loads(raw)
    if ask_usage:
        options = {**(expected.get("stream_options") or {}), "include_usage": True}
        expected = {**expected, "model": upstream, "stream_options": options}
    else:
        expected = {**expected, "model": upstream}
    assert _same(json.loads(out), expected)
    if not ask_usage and upstream == body.model:
        assert out == raw


def test_request_bodies_keep_their_bytes_but_the_model() -> None:
    raw = b'{"messages":[{"role":"user","content":"hi"}],"model":"client","n":123456789012345678901234}'
    out = _body(raw).for_hop(SimpleNamespace(upstream_model="real"), False)  # type: ignore[arg-type]
    assert out == raw.replace(b'"client"', b'"real"')
    out = _body(raw).for_hop(SimpleNamespace(upstream_model="real"), True)  # type: ignore[arg-type]
    assert (
        out
        == raw.replace(b'"client"', b'"real"')[:-1] + b',"stream_options":{"include_usage":true}}'
    )


def test_splice_refuses_what_it_cannot_prove() -> None:
    # An escaped top-level key and a nested plain one: the nested one must not be touched.
    raw = b'{"mod\\u0065l":"a","x":{"model":"a"}}'
    payload = json.loads(raw)
    expected = {**payload, "model": "b"}
    assert splice_models(raw, "b", expected, 1) is None
    out = rewrite_json_body(raw, "b")
    assert json.loads(out.body) == {"model": "b", "x": {"model": "a"}}


def test_loads_reads_like_json() -> None:
    for raw in (b"NaN", b'{"a": NaN}', b'"\\ud800"', b"\xef\xbb\xbf{}", b"1e400", b"[1]"):
        got, want = loads(raw), json.loads(raw)
        assert _same(got, want) or (isinstance(got, float) and math.isnan(got))
    for raw in (b"{bad", b"", b"\xff"):
        try:
            json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            try:
                loads(raw)
            except type(exc) as again:
                assert str(again) == str(exc)
            else:
                raise AssertionError(raw)


def test_usage_with_huge_counts_stays_exact() -> None:
    raw = b'{"model":"m","usage":{"prompt_tokens":123456789012345678901,"completion_tokens":1}}'
    assert rewrite_json_body(raw, "p").usage == (123456789012345678901, 1)
    event = rewrite_event(b"data: " + raw + b"\n\n", "p")
    assert usage_of(event.payload, event.source) == (123456789012345678901, 1)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from([b"data: x", b"\n", b"\r\n", b"\n\n", b"\r", b": c", b"y"]), max_size=30
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_splitter_fast_path_cuts_like_the_regex(pieces: list[bytes], cuts: list[int]) -> None:
    """Whatever the chunking, the events are what one regex pass over the whole stream finds."""
    stream = b"".join(pieces)
    expected, start = [], 0
    for match in re.finditer(rb"\r?\n\r?\n", stream):
        expected.append(stream[start : match.end()])
        start = match.end()
    splitter = SSESplitter()
    got: list[bytes] = []
    previous = 0
    for cut in [*sorted(c for c in cuts if c < len(stream)), len(stream)]:
        got += splitter.feed(stream[previous:cut])
        previous = cut
    assert got == expected
    assert splitter.pending == stream[start:]


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    before=_documents,
    after=_documents,
    usage=st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens", "x"]), _values),
    choices=st.lists(_values, min_size=1, max_size=2),
)
def test_usage_cut_matches_a_parse(
    data: Any, before: Any, after: Any, usage: Any, choices: Any
) -> None:
    """The usage chunk the client did not ask for loses `usage` exactly as re-encoding would."""
    usage = {"prompt_tokens": 1, "completion_tokens": 2, **usage}
    document = {**before, "model": "real-model", "usage": usage, "choices": choices, **after}
    if data.draw(st.booleans()):
        document = {"usage": usage, **document}
    raw = data.draw(_encoded(document))
    rewritten = rewrite_event(b"data: " + raw + b"\n\n", "public")
    out = _without_usage(rewritten, "public")
    expected = _reference(raw, "public")
    # Only a usage chunk disappears: counts and no choices (`after` may set either to null).
    if expected.pop("usage", None) is not None and not expected.get("choices"):
        assert out is None
        return
    assert out is not None and out.startswith(b"data: ") and out.endswith(b"\n\n")
    assert _same(json.loads(out[6:-2]), expected)


def test_usage_cut_keeps_the_bytes() -> None:
    raw = b'{"id":"c","model":"real","choices":[{"index":0}],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
    out = _cut_usage(rewrite_event(b"data: " + raw + b"\n\n", "public"))
    assert out == b'{"id":"c","model":"public","choices":[{"index":0}]}'


# Each one a reason for whole_event to step aside, or not.
_RELAYED_EVENTS = [
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"real-model","choices":[]}\n\n',
    b'data: {"id":"c1","model":"public","choices":[{"delta":{"content":"hi"}}]}\n\n',
    b'data: {"model":"real-model","choices":[],"usage":{"prompt_tokens":1,'
    b'"completion_tokens":2}}\n\n',
    b'data: {"model":"real-model","response":{"model":"real-model"}}\n\n',
    b'data: {"model":"real-model","choices":[{"delta":{"model":"x"}}]}\n\n',
    b'data: {"model":"real-model","choices":[{"delta":{"model":"real-model"}}]}\n\n',
    b'data: {"model":"real-model","model":"real-model"}\n\n',
    b'data: {"model": "real-model","choices":[]}\n\n',
    b'data: {"model": "real-model","x":{"model":"real-model"}}\n\n',
    b'data: {"model":"other-model","choices":[]}\n\n',
    b'data: {"model":"re\\u0061l","choices":[]}\n\n',
    b'data: {"model":"real-model","mod\\u0065l":"other"}\n\n',
    b'data: {"model":"real-model"}\r\n\r\n',
    b'data: {"model":\r"real-model"}\n\n',
    b'data:{"model":"real-model"}\n\n',
    b'data: {"model":"real-model",}\n\n',
    b'data: {"model":7}\n\n',
    b'data: ["model"]\n\n',
    b"data: [DONE]\n\n",
    b": keep-alive\n\n",
    b'event: x\ndata: {"model":"real-model"}\n\n',
]
_chunk_events = st.one_of(
    st.sampled_from(_RELAYED_EVENTS),
    _documents.map(
        lambda d: b"data: " + json.dumps({"model": "real-model", **d}).encode() + b"\n\n"
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    events=st.lists(_chunk_events, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4),
    shape=st.sampled_from(["per event", "grouped", "anywhere"]),
    strip_usage=st.booleans(),
)
@example(events=_RELAYED_EVENTS, cuts=[], shape="per event", strip_usage=True)
@example(events=_RELAYED_EVENTS, cuts=[], shape="per event", strip_usage=False)
@example(events=_RELAYED_EVENTS, cuts=[1, 3, 2], shape="grouped", strip_usage=False)
def test_relay_whole_event_path_matches_the_general_one(
    events: list[bytes], cuts: list[int], shape: str, strip_usage: bool
) -> None:
    """A chunk of whole plain events takes ModelSwap.whole_event (one) or whole_events
    (several); what the client is sent, the usage read and the record are what the splitter
    and `_event` give."""
    from gateway.middleware import RequestRecord
    from gateway.relay import _EventRewriter

    stream = b"".join(events)
    if shape == "per event":  # one event per read, as a paced stream arrives
        chunks = list(events)
    elif shape == "grouped":  # whole events, several per read, as back-to-back ones arrive
        sizes = [1 + c % 4 for c in cuts] or [len(events)]
        chunks, at = [], 0
        while at < len(events):
            size = sizes[len(chunks) % len(sizes)]
            chunks.append(b"".join(events[at : at + size]))
            at += size
    else:
        points = sorted({c for c in cuts if c < len(stream)} | {len(stream)})
        chunks = [stream[a:b] for a, b in zip([0, *points], points, strict=False) if b > a]
    outcomes = []
    for whole in (True, False):
        record = RequestRecord(request_id="r")
        rewriter = _EventRewriter("public", record, strip_usage)
        rewriter._whole = whole
        sent = [rewriter.feed(chunk) for chunk in chunks]
        outcomes.append(
            (
                b"".join(sent),
                record.prompt_tokens,
                record.completion_tokens,
                record.first_byte_at is None,
                rewriter._splitter.pending,
            )
        )
    assert outcomes[0] == outcomes[1]


def test_relay_whole_event_path_is_taken() -> None:
    """The paced stream's event goes through whole_event (so the test above compares two
    paths, not one path twice)."""
    swap = ModelSwap("public")
    event = b'data: {"id":"c","model":"real-model","choices":[]}\n\n'
    assert swap.whole_event(event) == b'data: {"id":"c","model":"public","choices":[]}\n\n'
    assert swap.whole_event(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert swap.whole_event(event + event) is None
    assert swap.whole_event(b'data: {"model":"m","usage":null}\n\n') is None


def test_relay_whole_events_path_is_taken() -> None:
    """Events that arrive together take whole_events, usage included (so the test above
    compares two paths); what it steps aside for goes to the general path."""
    from gateway.middleware import RequestRecord
    from gateway.relay import _EventRewriter

    swap = ModelSwap("public")
    event = b'data: {"id":"c","model":"real-model","choices":[]}\n\n'
    usage = b'data: {"model":"real-model","usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    mine = b'data: {"model":"public","choices":[]}\n\n'
    chunk = event + mine + usage + b"data: [DONE]\n\n"
    found = swap.whole_events(chunk)
    assert found is not None
    assert found[0] == chunk.replace(b'"real-model"', b'"public"')
    assert [data for _, data in found[1]] == [usage[6:-2]]
    assert found[2] == len(chunk)
    head = swap.whole_events(chunk, stop_at_usage=True)
    assert head is not None
    assert head[:3] == ((event + mine).replace(b'"real-model"', b'"public"'), [], len(event + mine))
    assert head[3] == (json.loads(usage[6:-2]), usage[6:-2])  # handed over parsed
    for other in (
        event + b'data: {"model":"other","choices":[]}\n\n',  # two upstream models
        event + b'data: {"model":"real-model","choices":[{"model":"x"}]}\n\n',
        event + b'data: {"model": "real-model","choices":[]}\n\n',  # spelled otherwise
        event + b"data: {not json}\n\n",
        event + b'data: {"model":"real-model"}\n\ndata: {"mod',  # ends inside an event
    ):
        assert swap.whole_events(other) is None, other
    record = RequestRecord(request_id="r")
    assert _EventRewriter("public", record, False).feed(chunk) == found[0]
    assert (record.prompt_tokens, record.completion_tokens) == (3, 4)
    record = RequestRecord(request_id="r")
    stripped = _EventRewriter("public", record, True).feed(chunk)
    assert b'"usage"' not in stripped  # the general path strips it
    assert stripped.startswith(head[0]) and stripped.endswith(b"data: [DONE]\n\n")
    assert (record.prompt_tokens, record.completion_tokens) == (3, 4)
