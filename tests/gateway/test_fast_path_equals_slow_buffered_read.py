"""gateway.buffered_read against aiohttp's `readany`: fed the same chunks, two readers give the
same bytes and are left in the same state (size, cursor, chunk ends, buffer, the protocol
paused or not), read after read. The relay's streams over real servers run through it too
(every relay test); this pins the reader's bookkeeping, which those tests would only see
as a stall or a lost byte much later."""

from __future__ import annotations

import asyncio

from aiohttp import streams
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.buffered_read import take_buffered


class _Protocol:
    """What a StreamReader asks of its connection: pause and resume, recorded."""

    def __init__(self) -> None:
        self.paused = False
        self.resumes = 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.paused = False
        self.resumes += 1


def _state(reader: streams.StreamReader, protocol: _Protocol) -> tuple[object, ...]:
    splits = reader._http_chunk_splits
    return (
        reader._size,
        reader._cursor,
        None if splits is None else list(splits),
        list(reader._buffer),
        reader._buffer_offset,
        protocol.paused,
        protocol.resumes > 0,
        reader.at_eof(),
    )


_rounds = st.lists(
    st.lists(st.binary(min_size=1, max_size=300), max_size=30), min_size=1, max_size=5
)


@settings(max_examples=200, deadline=None)
@given(
    rounds=_rounds,
    chunked=st.booleans(),
    limit=st.sampled_from([16, 64, 1024, 2**16]),
    eof=st.booleans(),
)
def test_take_buffered_reads_as_readany_does(
    rounds: list[list[bytes]], chunked: bool, limit: int, eof: bool
) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        slow_protocol, fast_protocol = _Protocol(), _Protocol()
        slow = streams.StreamReader(slow_protocol, limit, loop=loop)  # type: ignore[arg-type]
        fast = streams.StreamReader(fast_protocol, limit, loop=loop)  # type: ignore[arg-type]
        for reader in (slow, fast):
            if chunked:
                reader.begin_http_chunk_receiving()
        for number, chunks in enumerate(rounds):
            for reader in (slow, fast):
                for chunk in chunks:
                    reader.feed_data(chunk)
                    if chunked:
                        reader.end_http_chunk_receiving()
                if eof and number == len(rounds) - 1:
                    reader.feed_eof()
            if not chunks and not slow.at_eof():
                continue  # readany would wait: nothing to compare
            slow_protocol.resumes = fast_protocol.resumes = 0
            expected = await slow.readany()
            taken = take_buffered(fast)
            got = taken if taken is not None else await fast.readany()
            assert got == expected
            assert _state(fast, fast_protocol) == _state(slow, slow_protocol)

    asyncio.run(run())


def test_take_buffered_leaves_what_it_cannot_take_to_readany() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        reader = streams.StreamReader(_Protocol(), 2**16, loop=loop)  # type: ignore[arg-type]
        assert take_buffered(reader) is None  # nothing buffered: readany waits
        reader.feed_data(b"one")
        assert take_buffered(reader) is None  # one chunk: readany's own fast case
        reader.feed_data(b"two")
        reader.set_exception(ConnectionResetError())
        assert take_buffered(reader) is None  # failed: readany raises
        assert take_buffered(streams.EMPTY_PAYLOAD) is None  # not the reader it expects

    asyncio.run(run())


def test_take_buffered_takes_several_chunks_at_once() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        reader = streams.StreamReader(protocol, 2**16, loop=loop)  # type: ignore[arg-type]
        for chunk in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            reader.feed_data(chunk)
        assert take_buffered(reader) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        assert protocol.resumes == 1  # once, not once per chunk
        assert take_buffered(reader) is None

    asyncio.run(run())
