"""A backend body's buffered chunks taken in one go, where aiohttp's `readany` takes them one
by one.

`StreamReader.readany()` returns every chunk buffered, joined, but pops them one at a time
(`_read_nowait_chunk`), and each pop calls the connection protocol's `resume_reading()`, which
re-feeds the client parser with `b""` and resumes the transport: a few thousand instructions
per chunk. A backend that writes each event as its own HTTP chunk and sends them back to back
gives the gateway 20-odd chunks in one read, so a short stream paid that 20-odd times. This
takes them with one join and resumes the protocol once, leaving the reader as `readany` would
have (its size, cursor and chunk splits). It is used only on aiohttp's own StreamReader built
as this module expects (aiohttp 3.14, checked at import), with two chunks or more buffered and
nothing failed; anything else is `readany`'s.
tests/gateway/test_fast_path_equals_slow_buffered_read.py compares the two on the same feeds.
"""

from __future__ import annotations

from aiohttp import streams

# What the take reads and writes: StreamReader's slots, as aiohttp 3.14 names them.
_USED = {
    "_buffer",
    "_buffer_offset",
    "_cursor",
    "_exception",
    "_http_chunk_splits",
    "_low_water",
    "_low_water_chunks",
    "_protocol",
    "_size",
    "_timer",
}
_BUILT_AS_EXPECTED = set(getattr(streams.StreamReader, "__slots__", ())) >= _USED


def take_buffered(content: streams.StreamReader) -> bytes | None:
    """What `await content.readany()` would return now, with the reader left as it would
    leave it, when two chunks or more are buffered; else None (then `readany` itself)."""
    if not _BUILT_AS_EXPECTED or type(content) is not streams.StreamReader:
        return None
    buffer = content._buffer
    if len(buffer) < 2 or content._exception is not None or content._buffer_offset:
        return None
    content._timer.assert_timeout()
    data = b"".join(buffer)
    buffer.clear()
    content._size -= len(data)
    cursor = content._cursor = content._cursor + len(data)
    splits = content._http_chunk_splits
    while splits and splits[0] < cursor:  # the chunk ends read past, as each pop drops them
        splits.popleft()
    if content._size < content._low_water and (
        splits is None or len(splits) < content._low_water_chunks
    ):
        content._protocol.resume_reading()
    return data
