"""A chunk recognised by its stream's template (gateway.chunk_template) is sent exactly as the
parse would send it, whatever its text; and the relay takes that path."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.middleware import RequestRecord
from gateway.relay import _EventRewriter
from gateway.rewrite import ModelSwap

# Texts as a backend may send them, valid JSON string bodies or not: every way a text can
# break the JSON, or need an escape, or not be UTF-8.
_PIECES = [b"a", b" word", b"\xc3\xa9", b"\xe4\xb8\xad", b"\xf0\x9f\x99\x82", b"\x7f", b"'",
           b'"', b"\\", b'\\"', b"\\u00e9", b"\x00", b"\x01", b"\x1f", b"\n", b"\r", b"\t",
           b"\xff", b"\xc3", b"\xed\xa0\x80", b'","model":"x', b'"usage"', b"}", b"{"]  # fmt: skip
_texts = st.lists(st.sampled_from(_PIECES), max_size=6).map(b"".join)


def _chunk(text: bytes, model: str = "real-model", model_first: bool = True) -> bytes:
    """A chat completion chunk as vLLM and OpenAI write it, with `text` as the delta's
    content, byte for byte (not necessarily valid JSON)."""
    model_member = b'"model":' + json.dumps(model).encode() + b","
    head = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    choices = b'"choices":[{"index":0,"delta":{"content":"' + text + b'"},"finish_reason":null}]'
    if model_first:
        return b"data: " + head + model_member + choices + b"}\n\n"
    return b"data: " + head + choices + b"," + model_member[:-1] + b"}\n\n"


@settings(max_examples=300, deadline=None)
@given(text=_texts, model_first=st.booleans(), model=st.sampled_from(["real-model", "public"]))
@example(text=b"\x01", model_first=True, model="real-model")
@example(text=b"\xff", model_first=False, model="real-model")
def test_a_chunk_the_template_takes_parses_as_the_template_says(
    text: bytes, model_first: bool, model: str
) -> None:
    """Whatever the text, a chunk the template recognises is valid JSON, and what is sent
    for it is the parse's rewrite: its payload with the public id."""
    swap = ModelSwap("public")
    assert swap.whole_event(_chunk(b"learned", model, model_first)) is not None
    template = swap._template
    assert template is not None
    chunk = _chunk(text, model, model_first)
    recognised = template.text(chunk, len(chunk) - 2)
    if recognised is None:
        return
    assert recognised == text
    expected = json.loads(chunk[6:-2])  # raises when the template took invalid JSON
    expected["model"] = "public"
    sent = swap.whole_event(chunk)
    assert sent is not None and sent.endswith(b"\n\n")
    assert json.loads(sent[6:-2]) == expected
    # and the bytes are the chunk's, only the model's changed
    assert sent == chunk.replace(b'"model":"real-model"', b'"model":"public"')


def test_plain_texts_take_the_template() -> None:
    """ASCII, UTF-8 and DEL are plain text: no parse (so the test above compares two paths)."""
    swap = ModelSwap("public")
    swap.whole_event(_chunk(b"learned"))
    template = swap._template
    assert template is not None
    for text in (b"", b" word", b"\xc3\xa9\xe4\xb8\xad", b"\xf0\x9f\x99\x82", b"\x7f'"):
        chunk = _chunk(text)
        assert template.text(chunk, len(chunk) - 2) == text
    for text in (b'"', b"\\", b"\x1f", b"\n", b"\xff", b"\xed\xa0\x80"):
        chunk = _chunk(text)
        assert template.text(chunk, len(chunk) - 2) is None, text
    # Another shape (a role delta, a finish) is not this template's.
    other = _chunk(b"x").replace(b'"finish_reason":null', b'"finish_reason":"stop"')
    assert template.text(other, len(other) - 2) is None


_usage = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    b'"model":"real-model","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n'
)
_role = _chunk(b"").replace(b'{"content":""}', b'{"role":"assistant","content":""}')


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(_texts, min_size=1, max_size=8),
    model_first=st.booleans(),
    grouping=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=4),
    strip_usage=st.booleans(),
)
def test_relay_with_templates_matches_the_general_path(
    texts: list[bytes], model_first: bool, grouping: list[int], strip_usage: bool
) -> None:
    """A stream's chunks, one per read and grouped several per read, through the relay's
    whole-event paths (templates learned and used) and through the general path: the same
    bytes to the client, the same usage recorded."""
    events = [
        _role,
        *(_chunk(text, model_first=model_first) for text in texts),
        _usage,
        b"data: [DONE]\n\n",
    ]
    for sizes in ([1], grouping):
        chunks, at = [], 0
        while at < len(events):
            size = sizes[len(chunks) % len(sizes)]
            chunks.append(b"".join(events[at : at + size]))
            at += size
        outcomes = []
        for whole in (True, False):
            record = RequestRecord(request_id="r")
            rewriter = _EventRewriter("public", record, strip_usage)
            rewriter._whole = whole
            sent = b"".join(rewriter.feed(chunk) for chunk in chunks)
            outcomes.append((sent, record.prompt_tokens, record.completion_tokens))
        assert outcomes[0] == outcomes[1]


def test_a_paced_stream_is_relayed_by_its_template() -> None:
    """After the first content chunk, each one is recognised, not parsed: the template is
    the one learned from the first and stays."""
    rewriter = _EventRewriter("public", RequestRecord(request_id="r"), True)
    rewriter.feed(_role)
    rewriter.feed(_chunk(b"first"))
    learned = rewriter._swap._template
    assert learned is not None and learned.text(_chunk(b"next"), len(_chunk(b"next")) - 2)
    for word in (b" a", b" b", b" c"):
        assert rewriter.feed(_chunk(word)) == _chunk(word).replace(b"real-model", b"public")
        assert rewriter._swap._template is learned


def test_a_stream_whose_chunks_vary_elsewhere_stops_being_learned_from() -> None:
    """Chunks that differ in more than their text (each id its own) never match the last
    template: after a few tries, none is learned, and every chunk is still sent right."""
    swap = ModelSwap("public")
    learned = []
    for n in range(10):
        chunk = _chunk(b"x").replace(b"chatcmpl-1", b"chatcmpl-%d" % n)
        assert swap.whole_event(chunk) == chunk.replace(b"real-model", b"public")
        learned.append(swap._template)
    assert len({id(t) for t in learned}) == 4  # then the fourth one stays
    assert learned[3] is learned[-1]
