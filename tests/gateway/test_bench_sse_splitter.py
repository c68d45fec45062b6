"""Micro-benchmarks of the SSE splitter (wire/sse.py), the first step of every relayed event.

`make test` runs each once, untimed (`--benchmark-disable`), as a plain test of its result;
`make bench-micro` times them."""

from __future__ import annotations

import json

from wire.sse import SSESplitter

CHUNK = (
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "meta-llama/Meta-Llama-3-8B-Instruct",
            "choices": [{"index": 0, "delta": {"content": "word"}, "finish_reason": None}],
        }
    ).encode()
    + b"\n\n"
)
STREAM = CHUNK * 200  # a 200-token answer


def split(reads: list[bytes]) -> list[bytes]:
    splitter = SSESplitter()
    events: list[bytes] = []
    for read in reads:
        events += splitter.feed(read)
    return events


def test_one_event_per_read(benchmark) -> None:
    """The usual case on loopback: each read is one whole event (the fast path)."""
    events = benchmark(split, [CHUNK] * 200)
    assert events == [CHUNK] * 200


def test_events_cut_by_4k_reads(benchmark) -> None:
    """Events straddling network reads: part of each read waits in the buffer."""
    reads = [STREAM[i : i + 4096] for i in range(0, len(STREAM), 4096)]
    events = benchmark(split, reads)
    assert events == [CHUNK] * 200


def test_crlf_framing(benchmark) -> None:
    """CRLF-framed events take the regex path."""
    crlf = CHUNK.replace(b"\n\n", b"\r\n\r\n")
    events = benchmark(split, [crlf] * 200)
    assert events == [crlf] * 200


def test_a_4_mb_event_in_64k_reads(benchmark) -> None:
    """A big event (a base64 image) arriving in many reads costs linear time."""
    big = b"data: " + b"A" * (4 * 1024 * 1024) + b"\n\n"
    reads = [big[i : i + 65536] for i in range(0, len(big), 65536)]
    events = benchmark(split, reads)
    assert events == [big]
