"""Model-id rewriting: request bodies on the way in, JSON bodies and SSE events on the way out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.chunk_template import ChunkTemplate
from gateway.chunk_template import learn as learn_template

_COMPACT = (",", ":")


def dumps(payload: Any) -> bytes:
    """Compact JSON in UTF-8. A lone surrogate (which JSON may spell, `\\ud800`, and Python's
    json reads, from that or from UTF-8 bytes encoding one) has no UTF-8: such a document is
    written with every non-ASCII character escaped, which any JSON reader reads the same."""
    text = json.dumps(payload, separators=_COMPACT, ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(payload, separators=_COMPACT).encode()


def loads(data: bytes) -> Any:
    """`json.loads`, faster, for reading a document: orjson parses what it accepts; whatever it
    refuses (NaN, lone surrogates, a BOM, UTF-16, deep nesting) goes to json, which keeps the
    last word on what is valid and on the error raised.

    orjson reads integers beyond 64 bits as floats, so a payload from here is for reading
    (`model`, `stream`, `usage`); what is re-encoded is parsed with `json.loads`."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


# A `"model"` member whose value is a string, at any depth. Outside a string `"` is never
# escaped and inside one it always is, so each match is a real key, never text in a value.
_MODEL_MEMBER = re.compile(rb'("model"[ \t\r\n]*:[ \t\r\n]*)"(?:[^"\\]|\\.)*"')


def _model_value(data: bytes, at: int, plain: bool) -> tuple[int, int] | None:
    """Where the string value of the `"model"` member at `at` starts and ends (its quotes
    included), or None if `at` is not such a member. `plain`: `data` has no backslash, so
    a string ends at the next quote; that is most documents, and cheaper than the regex.
    (`b in bytes` is avoided on hot paths too: on 3.11 it first tries the operand as an
    integer, and raises and clears a TypeError, which costs more than the search.)"""
    if plain and data[at + 7 : at + 9] == b':"':
        end = data.find(b'"', at + 9)
        return None if end == -1 else (at + 8, end + 1)
    member = _MODEL_MEMBER.match(data, at)
    return None if member is None else (member.end(1), member.end())


def splice_models(
    data: bytes, new_model: str, expected: Any, places: int, append: bytes = b""
) -> bytes | None:
    """`data` with the string value of its `"model"` members set to `new_model` (and `append`,
    members of its own, added at the end of the top-level object), without re-encoding the
    rest; None when that would not be exactly `expected`, what a parse and re-encode gives.

    `places` is how many `"model"` members `expected` changed or kept. When the document has
    no backslash at all, no key is written with an escape, so every `"model"` key with a string
    value is a match: as many matches as places proves they are the ones. Otherwise the result
    is parsed and compared with `expected`."""
    try:
        value = orjson.dumps(new_model)
    except TypeError:  # a lone surrogate: json's own path decides what happens
        return None
    pieces: list[bytes] = []
    done = 0  # data[:done] is in `pieces` already
    find = data.find
    plain = find(b"\\") == -1
    position = find(b'"model"')
    while position != -1:
        span = _model_value(data, position, plain)
        if span is None:
            position = find(b'"model"', position + 1)
            continue
        pieces += (data[done : span[0]], value)
        done = span[1]
        position = find(b'"model"', done)
    count = len(pieces) // 2
    if count == 0:
        return None
    pieces.append(data[done:])
    spliced = b"".join(pieces)
    if append:
        end = spliced.rstrip()
        if not end.endswith(b"}"):
            return None
        spliced = end[:-1] + b"," + append + b"}"
    if count != places or not plain:
        try:
            if loads(spliced) != expected:
                return None
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    return spliced


def model_places(payload: Any) -> int:
    """How many `"model"` members `set_response_model` looks at (top level, `response`)."""
    if not isinstance(payload, dict):
        return 0
    nested = payload.get("response")
    return isinstance(payload.get("model"), str) + (
        isinstance(nested, dict) and isinstance(nested.get("model"), str)
    )


def set_response_model(payload: Any, public_id: str) -> bool:
    """Put the public id wherever a response names its model; True if anything changed.

    Chat/completions/embeddings carry `model` at the top level; the Responses API nests it in
    `response.model`.
    """
    if not isinstance(payload, dict):
        return False
    changed = False
    if isinstance(payload.get("model"), str) and payload["model"] != public_id:
        payload["model"] = public_id
        changed = True
    nested = payload.get("response")
    if (
        isinstance(nested, dict)
        and isinstance(nested.get("model"), str)
        and nested["model"] != public_id
    ):
        nested["model"] = public_id
        changed = True
    return changed


def usage_of(payload: Any, data: bytes | None = None) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a response's or event's `usage`, if it carries one.

    With `data`, the JSON that `payload` was read from: a count that came out as a float is
    read again with json, where an integer beyond 64 bits stays an integer."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict) and isinstance(payload.get("response"), dict):
        usage = payload["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        if data is not None and (isinstance(prompt, float) or isinstance(completion, float)):
            return usage_of(json.loads(data))
        return None
    return prompt, completion


@dataclass(slots=True)
class RewrittenBody:
    body: bytes
    upstream_model: str | None
    usage: tuple[int, int] | None
    response_id: str | None = None  # the `id` of a Responses API object (`object: response`)


def rewrite_json_body(body: bytes, public_id: str) -> RewrittenBody:
    """A JSON response body with the public id put back; non-JSON bodies pass untouched.
    Only the model's bytes change when that can be proven exact; else it is re-encoded."""
    try:
        payload = loads(body)
    except (ValueError, UnicodeDecodeError):
        return RewrittenBody(body, None, None)
    upstream_model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(upstream_model, str):
        upstream_model = None
    usage = usage_of(payload, body)
    response_id = response_id_of(payload)
    places = model_places(payload)
    if set_response_model(payload, public_id):
        spliced = splice_models(body, public_id, payload, places)
        if spliced is None:
            exact = json.loads(body)
            set_response_model(exact, public_id)
            spliced = dumps(exact)
        body = spliced
    return RewrittenBody(body, upstream_model, usage, response_id)


def response_id_of(payload: Any) -> str | None:
    """The id of the Responses API object a body is (`object: response`) or an event carries
    (`response.id`): what requests naming it later are routed by."""
    if payload.__class__ is not dict:
        return None
    if payload.get("object") != "response":
        payload = payload.get("response")
        if payload.__class__ is not dict or payload.get("object", "response") != "response":
            return None
    found = payload.get("id")
    return found if isinstance(found, str) and found else None


@dataclass(slots=True)
class RewrittenEvent:
    data: bytes
    payload: Any  # the parsed JSON of the event's data (for reading only, see `loads`), or None
    source: bytes = b""  # the event's JSON data as the backend sent it

    def exact_payload(self, public_id: str) -> Any:
        """The payload parsed with json and rewritten, for re-encoding."""
        payload = json.loads(self.source)
        set_response_model(payload, public_id)
        return payload


def _one_line_data(event: bytes) -> bytes | None:
    """The data of the common event, one `data:` line ending in LF LF; None for any other."""
    if (
        not event.startswith(b"data:")
        or event.find(b"\n") != len(event) - 2
        or not event.endswith(b"\n\n")
        or event.find(b"\r") != -1
    ):
        return None
    data = event[5:-2]
    return data[1:] if data.startswith(b" ") else data


def _encoded_id(public_id: str) -> bytes | None:
    try:
        return orjson.dumps(public_id)
    except TypeError:  # a lone surrogate: json's own path decides what happens
        return None


def _swap_chunk_model(
    event: bytes, data: bytes, payload: Any, public_id: str, value: bytes | None
) -> bytes | None:
    """The SSE fast path: a chunk with `model` at its top level only gets the public id's
    bytes (`value`, its JSON) in place of the model's; None where that is not provably what
    a parse and re-encode would give. With no backslash in the data and one `"model"` in all
    its bytes, that one is the top-level key (see splice_models). Sets `payload["model"]`."""
    if payload.__class__ is not dict or payload.get("response") is not None:
        return None
    model = payload.get("model")
    if model.__class__ is not str:
        return None
    if model == public_id:
        return event
    at = data.find(b'"model"')
    if value is None or data.find(b"\\") != -1 or data.find(b'"model"', at + 7) != -1:
        return None
    span = _model_value(data, at, True)
    if span is None:
        return None
    payload["model"] = public_id
    return b"".join((b"data: ", data[: span[0]], value, data[span[1] :], b"\n\n"))


def rewrite_event(event: bytes, public_id: str) -> RewrittenEvent:
    """One SSE event (ending in its blank line) with `model` rewritten in its JSON data.

    Comment, `event:` and `id:` lines keep their place; multi-line `data:` is joined as the
    SSE spec says and re-emitted as one line. Events that are not JSON pass byte for byte.
    """
    data = _one_line_data(event)
    if data is None:
        return _rewrite_event_slowly(event, public_id)
    if data.strip() == b"[DONE]":
        return RewrittenEvent(event, None)
    try:
        payload = loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _rewrite_event_slowly(event, public_id)
    swapped = _swap_chunk_model(event, data, payload, public_id, _encoded_id(public_id))
    if swapped is not None:
        return RewrittenEvent(swapped, payload, data)
    places = model_places(payload)
    if not set_response_model(payload, public_id):
        return RewrittenEvent(event, payload, data)
    spliced = splice_models(data, public_id, payload, places)
    if spliced is not None:
        return RewrittenEvent(b"data: " + spliced + b"\n\n", payload, data)
    return _rewrite_event_slowly(event, public_id)


# Templates learned with none of them recognising a chunk before a stream is not learned from
# again. A stream needs two at most: its first chunk (the role) and its first text.
_LEARNING_TRIES = 4


class ModelSwap:
    """`rewrite_event`'s fast path for one stream: the public id's JSON is encoded once per
    stream, and no RewrittenEvent is made per event."""

    __slots__ = ("_learned", "_public_id", "_template", "_value")

    def __init__(self, public_id: str) -> None:
        self._public_id = public_id
        self._value = _encoded_id(public_id)
        # The stream's chunk shape, from the last plain chunk parsed (gateway.chunk_template):
        # a chunk of that shape needs no parse.
        self._template: ChunkTemplate | None = None
        self._learned = 0  # templates learned since the last chunk one of them recognised

    def event(self, event: bytes) -> tuple[bytes, Any, bytes] | None:
        """(what to send, the parsed payload, the JSON data as sent), or None: not the
        common case, `rewrite_event` decides. Gives exactly what `rewrite_event` gives."""
        data = _one_line_data(event)
        if data is None:
            return None
        if data == b"[DONE]":  # as rewrite_event gives it, without a failed parse first
            return event, None, b""
        try:
            payload = loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        out = _swap_chunk_model(event, data, payload, self._public_id, self._value)
        return None if out is None else (out, payload, data)

    def whole_event(self, chunk: bytes) -> bytes | None:
        """What the relay sends for `chunk` when it is one whole common event and nothing
        else (`data: ` and JSON on one line, LF LF), with no backslash and no `"usage"` in
        its bytes: `event` and the relay's usage check in one pass, without the tuple or the
        payload kept. None for anything else, which takes the general path. (A paced stream
        reads one event at a time, and this is its per-event work.)"""
        template = self._template
        if template is not None and chunk[-2:] == b"\n\n":
            text = template.text(chunk, len(chunk) - 2)
            if text is not None:
                self._learned = 0
                return chunk if template.same else template.out(text)
        if (
            chunk[:6] != b"data: "
            or chunk.find(b"\n") != len(chunk) - 2
            or chunk[-1:] != b"\n"
            or chunk.find(b"\r") != -1
            or chunk.find(b"\\") != -1
            or chunk.find(b'"usage"') != -1
        ):
            return None
        data = chunk[6:-2]
        if data == b"[DONE]":
            return chunk
        payload = _plain_chunk(chunk, data)
        if payload is None:
            return None
        model = payload["model"]
        at = data.find(b'"model"')
        span = None if data.find(b'"model"', at + 7) != -1 else _model_value(data, at, True)
        if model == self._public_id:
            if span is not None:
                self._learn(chunk[:-2], model, span, data[span[0] : span[1]])
            return chunk
        value = self._value
        if value is None or span is None:
            return None
        self._learn(chunk[:-2], model, span, value)
        return b"".join((b"data: ", data[: span[0]], value, data[span[1] :], b"\n\n"))

    def _learn(self, line: bytes, model: str, span: tuple[int, int], value: bytes) -> None:
        """A plain chunk's shape, for the chunks after it (`span`: its model's JSON in its
        data, `value`: what the relay puts there). A chunk with no shape to learn keeps the
        one learned before. A stream whose chunks differ in more than their text (a stamp in
        each id, say) is not learned from again after a few tries: each costs a microsecond."""
        if self._learned >= _LEARNING_TRIES:
            return
        learned = learn_template(line, model, (span[0] + 6, span[1] + 6), value)
        if learned is not None:
            self._template = learned
            self._learned += 1

    def whole_events(
        self, chunk: bytes, stop_at_usage: bool = False
    ) -> tuple[bytes, list[tuple[dict, bytes]], int, tuple[dict, bytes] | None] | None:
        """`whole_event` for a chunk of several whole common events (what a backend that
        sends its events back to back gives in one read): (what to send for the events up
        to `end`, the payloads among them that carry `usage` with their JSON data, `end`,
        `stopped`), or None for the general path. `end` is the chunk's length, or with
        `stop_at_usage` where the first event with `usage` starts (that one and the rest are
        the caller's; `stopped` is that event's payload and JSON data, already parsed).

        Every JSON event is still parsed (an event that is not valid JSON passes unchanged),
        but the swap is one `replace` over the chunk instead of a splice per event. It is
        exact when: no backslash (no key or value is spelled with an escape, so every
        `"model"` in the bytes is the JSON string "model"); each JSON event is an object with
        a string `model` at its top level and no `response`; `"model"` occurs once per JSON
        event (so it is that top-level key, and no value nor other key is spelled so); and
        one model, written `"model":` and its JSON, occurs as many times as there are events
        whose model is not the public id (so it is each one's)."""
        if chunk[:6] != b"data: " or chunk.find(b"\r") != -1 or chunk.find(b"\\") != -1:
            return None
        parts = chunk.split(b"\n\n")
        # Ends with an event's end, and every event is one line (no other LF in the chunk).
        if parts.pop() != b"" or chunk.count(b"\n") != 2 * len(parts):
            return None
        public_id = self._public_id
        old: str | None = None
        swaps = documents = end = 0
        with_usage: list[tuple[dict, bytes]] = []
        stopped = None
        for part in parts:
            if part != b"data: [DONE]":
                template = self._template
                if template is not None and template.text(part, len(part)) is not None:
                    self._learned = 0
                    model = template.model  # and no usage: the template's bytes have none
                else:
                    data = part[6:]
                    payload = _plain_chunk(part, data)
                    if payload is None:
                        return None
                    model = payload["model"]
                    if "usage" in payload:
                        if stop_at_usage:
                            stopped = (payload, data)
                            break
                        with_usage.append((payload, data))
                    else:
                        self._learn_part(part, data, model)
                documents += 1
                if model != public_id:
                    old = model
                    swaps += 1
            end += len(part) + 2
        out = self._swapped(chunk if end == len(chunk) else chunk[:end], documents, old, swaps)
        return None if out is None else (out, with_usage, end, stopped)

    def parsed_event(
        self, event: bytes, data: bytes, payload: dict
    ) -> tuple[bytes, Any, bytes] | None:
        """`event` for a common event already parsed (`data`, its JSON, read to `payload`,
        a dict with a string `model`), as whole_events hands one over: the same answer."""
        out = _swap_chunk_model(event, data, payload, self._public_id, self._value)
        return None if out is None else (out, payload, data)

    def _learn_part(self, part: bytes, data: bytes, model: str) -> None:
        """`_learn` for one of whole_events' parts: its model member found as whole_event
        finds it (one `"model"`, a plain string), the value the swap puts there."""
        at = data.find(b'"model"')
        if data.find(b'"model"', at + 7) != -1:
            return
        span = _model_value(data, at, True)
        value = data[span[0] : span[1]] if span and model == self._public_id else self._value
        if span is not None and value is not None:
            self._learn(part, model, span, value)

    def _swapped(self, events: bytes, documents: int, old: str | None, swaps: int) -> bytes | None:
        """whole_events' swap, where the counts prove it exact."""
        if events.count(b'"model"') != documents:
            return None
        return events if old is None else _replace_model(events, old, swaps, self._value)


def _replace_model(chunk: bytes, old: str, times: int, value: bytes | None) -> bytes | None:
    """`chunk` with each `"model":` + `old` (its JSON) given `value` instead, provided it is
    written so exactly `times` times; else None."""
    if value is None:
        return None
    written = b'"model":' + orjson.dumps(old)
    if chunk.count(written) != times:
        return None
    return chunk.replace(written, b'"model":' + value)


def _plain_chunk(event: bytes, data: bytes) -> dict | None:
    """The payload of a `data: ` event of one line (`data`, its JSON) that is a chunk with a
    string `model` at its top level and no `response`; None for any other event."""
    if event[:6] != b"data: ":
        return None
    try:
        payload = loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if payload.__class__ is not dict or payload.get("response") is not None:
        return None
    return payload if payload.get("model").__class__ is str else None


def _rewrite_event_slowly(event: bytes, public_id: str) -> RewrittenEvent:
    """Any event: its data lines joined, parsed with json, re-encoded when the model changes."""
    lines = event.splitlines()
    while lines and not lines[-1]:  # the blank line that ends the event
        lines.pop()
    data_parts = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    if not data_parts:
        return RewrittenEvent(event, None)
    data = b"\n".join(data_parts)
    if data.strip() == b"[DONE]":
        return RewrittenEvent(event, None)
    try:
        payload = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return RewrittenEvent(event, None)
    if not set_response_model(payload, public_id):
        return RewrittenEvent(event, payload, data)
    out: list[bytes] = []
    data_written = False
    for line in lines:
        if line.startswith(b"data:"):
            if not data_written:
                out.append(b"data: " + dumps(payload))
                data_written = True
        else:
            out.append(line)
    return RewrittenEvent(b"\n".join(out) + b"\n\n", payload, data)
