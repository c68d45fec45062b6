"""A token stream's chunks, recognised by their shape instead of parsed one by one.

Chunk after chunk, a backend sends the same JSON with only the delta's text changed: the id,
`created`, the model and every other member stay (OpenAI, vLLM, SGLang, llama.cpp and
Ollama alike). Once one chunk has been parsed, the next one is that chunk's bytes up to
`"content":"` (`head`), some text, and the same bytes from the text's closing quote
(`tail`). When the text is a plain JSON string body, the chunk is valid JSON because its
template is, and parses to the template's payload with another text. So it needs no parse:
what the relay sends for it is the template's output around the new text.

The proof, which tests/gateway/test_fast_path_equals_slow_chunk_template.py checks against
the parse: the template's data is valid JSON with no backslash, so every quote in it opens or
closes a string, and the first `"content":"` is a key and the opening quote of its string
value, which ends at the next quote. A text with no quote, no backslash, no control character
and valid UTF-8 is a JSON string body (RFC 8259, section 7), so the chunk is valid JSON; it has
no backslash and the same one `"model"` member and no `"usage"` in its bytes; and the model
member, in `head` or `tail`, is rewritten the same way in every chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTENT = b'"content":"'
# A JSON string body that needs no escape and holds no backslash (RFC 8259, section 7).
_PLAIN_TEXT = re.compile(rb'[^"\\\x00-\x1f]*')


@dataclass(frozen=True, slots=True)
class ChunkTemplate:
    """One stream's chunk shape: `head` + text + `tail` in (a `data: ` line, without its
    LF LF), `out_head` + the same text + `out_tail` out; `model`, the model it names, and
    `same`, whether out is in (the model is already the public id)."""

    head: bytes
    tail: bytes
    out_head: bytes
    out_tail: bytes
    model: str
    same: bool

    def text(self, line: bytes, stop: int) -> bytes | None:
        """The delta's text when `line[:stop]` (a `data: ` line) is a chunk of this shape
        with a plain text; else None."""
        head, tail = self.head, self.tail
        end = stop - len(tail)
        if end < len(head) or not line.startswith(head) or not line.endswith(tail, 0, stop):
            return None
        text = line[len(head) : end]
        if _PLAIN_TEXT.fullmatch(text) is None:
            return None
        if not text.isascii():
            try:
                text.decode()
            except UnicodeDecodeError:
                return None
        return text

    def out(self, text: bytes) -> bytes:
        """What the relay sends for a chunk of this shape with `text`, with its LF LF."""
        return b"".join((self.out_head, text, self.out_tail, b"\n\n"))


def learn(
    line: bytes, model: str, model_span: tuple[int, int], value: bytes
) -> ChunkTemplate | None:
    """The template of a chunk the relay has parsed and rewritten: `line`, its `data: ` line
    (one line, no CR, no backslash, one `"model"`, valid JSON whose top-level `model` is
    `model`), where `model_span` is that model's JSON string and `value` what replaces it
    (the same bytes when nothing is rewritten). None for a chunk with no text to vary or any
    `"usage"` in its bytes."""
    at = line.find(_CONTENT)
    if at == -1 or line.find(b'"usage"') != -1:
        return None
    start = at + len(_CONTENT)
    end = line.find(b'"', start)
    if end == -1:
        return None
    head, tail = line[:start], line[end:]
    first, last = model_span
    same = line[first:last] == value
    if same:
        out_head, out_tail = head, tail
    elif last <= at:
        out_head, out_tail = line[:first] + value + line[last:start], tail
    elif first > end:
        out_head, out_tail = head, line[end:first] + value + line[last:]
    else:
        return None
    return ChunkTemplate(head, tail, out_head, out_tail, model, same)
