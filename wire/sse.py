"""Server-Sent Events framing: an incremental splitter and the encoders both servers use."""

from __future__ import annotations

import json
import re
from typing import Any

DONE_EVENT = b"data: [DONE]\n\n"

# An event ends at a blank line; lines may end in LF or CRLF (bare-CR framing is not supported).
# `EVENT_END` is the definition; `event_end` finds the same ends with two `find`s, which skip
# ahead with memchr where the regex tries a match at every byte (ten times the cost on an
# event of 270 bytes; tests/gateway/test_sse.py holds the two equal).
EVENT_END = re.compile(rb"\r?\n\r?\n")


def encode_data(payload: Any) -> bytes:
    """One `data:` event carrying `payload` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


# The most an event may grow to without ending (the splitter's default limit).
MAX_EVENT_BYTES = 64 * 1024 * 1024


class EventTooLarge(Exception):
    """An event grew past the splitter's limit without ending."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an SSE event exceeded {limit} bytes")


def event_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the first event to end at or after `start` ends (just past its blank line), as
    `EVENT_END.search(data, start).end()` gives it; -1 when none does. Every terminator holds
    LF LF or LF CR LF, and the first of those two to occur is in the leftmost match, which
    ends with it (a CR before it only moves the match's start). An LF CR LF that starts
    before the first LF LF ends at most one byte past that LF LF's start."""
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\n\r\n", start, None if lf == -1 else lf + 1)
    if crlf != -1:
        return crlf + 3
    return -1 if lf == -1 else lf + 2


def event_ended(data: bytes | bytearray, start: int = 0) -> bool:
    """Whether an event ends in `data` (a blank line at or after `start`), for a reader
    that only needs to know that, not the events (SSESplitter.feed builds each one)."""
    return event_end(data, start) != -1


class SSESplitter:
    """Cuts a byte stream into whole events, whatever the network chunking.

    It scans only the bytes it has not scanned before, so an event of several megabytes
    that arrives in thousands of chunks costs linear time, and it has no line-length limit
    of its own (unlike `StreamReader.readline`), only `max_event_bytes`.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add `chunk`; return the events it completes, each ending in its blank line."""
        if not self._buffer and chunk.find(b"\r") == -1:
            # The common case, nothing pending and LF framing: the terminator is exactly
            # LF LF, found left to right as the regex would, without copying into the buffer.
            parts = chunk.split(b"\n\n")
            rest = parts.pop()
            if rest:
                self._buffer += rest
                self._scanned = len(rest)
                if self._scanned > self._max:
                    raise EventTooLarge(self._max)
            return [part + b"\n\n" for part in parts]
        self._buffer += chunk
        events: list[bytes] = []
        start = 0
        # A terminator may straddle chunks: rescan the last 3 bytes of the previous search.
        pos = max(0, self._scanned - 3)
        buffer = self._buffer
        while (end := event_end(buffer, pos)) != -1:
            events.append(bytes(buffer[start:end]))
            start = pos = end
        if start:
            del self._buffer[:start]
        self._scanned = len(self._buffer)
        if self._scanned > self._max:
            raise EventTooLarge(self._max)
        return events

    def empty(self) -> bool:
        """Nothing pending: the next chunk starts an event."""
        return not self._buffer

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has started but not ended."""
        return bytes(self._buffer)
