"""Server-Sent Events framing: an incremental splitter and the encoders both servers use."""

from __future__ import annotations

import json
import re
from typing import Any

DONE_EVENT = b"data: [DONE]\n\n"

# An event ends at a blank line; lines may end in LF or CRLF (bare-CR framing is not supported).
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def encode_data(payload: Any) -> bytes:
    """One `data:` event carrying `payload` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


# The most an event may grow to without ending (the splitter's default limit).
MAX_EVENT_BYTES = 64 * 1024 * 1024


class EventTooLarge(Exception):
    """An event grew past the splitter's limit without ending."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an SSE event exceeded {limit} bytes")


def event_ended(data: bytes | bytearray, start: int = 0) -> bool:
    """Whether an event ends in `data` (a blank line at or after `start`), for a reader
    that only needs to know that, not the events (SSESplitter.feed builds each one)."""
    return _EVENT_END.search(data, start) is not None


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
        while True:
            match = _EVENT_END.search(self._buffer, pos)
            if match is None:
                break
            events.append(bytes(self._buffer[start : match.end()]))
            start = pos = match.end()
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
