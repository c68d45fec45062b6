"""Model-id rewriting: request bodies on the way in, JSON bodies and SSE events on the way out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_COMPACT = (",", ":")


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=_COMPACT, ensure_ascii=False).encode()


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


def usage_of(payload: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a response's or event's `usage`, if it carries one."""
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
        return None
    return prompt, completion


@dataclass(slots=True)
class RewrittenBody:
    body: bytes
    upstream_model: str | None
    usage: tuple[int, int] | None


def rewrite_json_body(body: bytes, public_id: str) -> RewrittenBody:
    """A JSON response body with the public id put back; non-JSON bodies pass untouched."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return RewrittenBody(body, None, None)
    upstream_model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(upstream_model, str):
        upstream_model = None
    usage = usage_of(payload)
    if set_response_model(payload, public_id):
        body = dumps(payload)
    return RewrittenBody(body, upstream_model, usage)


@dataclass(slots=True)
class RewrittenEvent:
    data: bytes
    payload: Any  # the parsed JSON of the event's data, or None
    done: bool


# A single-line `data:` event whose JSON object starts with simple scalar members and then
# `"model": "<string>"`, as OpenAI, vLLM, Ollama and llama.cpp all send their chunks. The
# members before it being plain scalars proves the key is top level, so its value can be
# swapped in place without parsing the event.
_FAST_EVENT = re.compile(
    rb'\Adata: ?(\{\s*(?:"[A-Za-z_]+"\s*:\s*(?:"[^"\\\n]*"|-?\d+|null|true|false)\s*,\s*)*'
    rb'"model"\s*:\s*)"(?:[^"\\\n]|\\.)*"([^\r\n]*)(?:\r?\n){2}\Z'
)
# Only events that carry usage (or a nested Responses-API object) need a full parse.
_NEEDS_PARSE = re.compile(rb'"usage"\s*:\s*\{|"response"\s*:|"model"\s*:')


def rewrite_event(event: bytes, public_id: str) -> RewrittenEvent:
    """One SSE event (ending in its blank line) with `model` rewritten in its JSON data.

    Comment, `event:` and `id:` lines keep their place; multi-line `data:` is joined as the
    SSE spec says and re-emitted as one line. Events that are not JSON pass byte for byte.
    """
    fast = _FAST_EVENT.match(event)
    if fast is not None and not _NEEDS_PARSE.search(event, fast.end(1)):
        # The common chunk: the model swapped in place, no parse, no re-encode.
        head, tail = fast.group(1), fast.group(2)
        data = head + json.dumps(public_id, ensure_ascii=False).encode() + tail
        # No parse, so no payload to report (events with usage never take this path).
        return RewrittenEvent(b"data: " + data + b"\n\n", None, False)
    lines = event.splitlines()
    while lines and not lines[-1]:  # the blank line that ends the event
        lines.pop()
    data_parts = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    if not data_parts:
        return RewrittenEvent(event, None, False)
    data = b"\n".join(data_parts)
    if data.strip() == b"[DONE]":
        return RewrittenEvent(event, None, True)
    try:
        payload = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return RewrittenEvent(event, None, False)
    if not set_response_model(payload, public_id):
        return RewrittenEvent(event, payload, False)
    out: list[bytes] = []
    data_written = False
    for line in lines:
        if line.startswith(b"data:"):
            if not data_written:
                out.append(b"data: " + dumps(payload))
                data_written = True
        else:
            out.append(line)
    return RewrittenEvent(b"\n".join(out) + b"\n\n", payload, False)
