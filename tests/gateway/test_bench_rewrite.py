"""Micro-benchmarks of the model rewrite on every event and body (gateway/rewrite.py): the
fast paths beside the slow path they must equal (test_fast_path_equals_slow_rewrite.py
proves the equality).

`make test` runs each once, untimed (`--benchmark-disable`), as a plain test of its result;
`make bench-micro` times them."""

from __future__ import annotations

import json

from gateway.rewrite import ModelSwap, _rewrite_event_slowly, rewrite_event, rewrite_json_body
from tests.gateway.backend import chat_completion, chunk

UPSTREAM = "meta-llama/Meta-Llama-3-8B-Instruct"
PUBLIC = "llama-8b"
EVENT = b"data: " + json.dumps(chunk(UPSTREAM, "word")).encode() + b"\n\n"
EXPECTED = b"data: " + json.dumps(chunk(PUBLIC, "word")).encode() + b"\n\n"
BODY = json.dumps(chat_completion(UPSTREAM, "Hello! " * 100)).encode()


def test_rewrite_event_fast_path(benchmark) -> None:
    assert benchmark(rewrite_event, EVENT, PUBLIC).data == EXPECTED


def test_rewrite_event_slow_path(benchmark) -> None:
    """What every event would cost without the fast paths: parse, set, re-encode."""
    rewritten = benchmark(_rewrite_event_slowly, EVENT, PUBLIC)
    assert json.loads(rewritten.data[6:]) == json.loads(EXPECTED[6:])


def test_model_swap_per_stream(benchmark) -> None:
    swap = ModelSwap(PUBLIC)
    result = benchmark(swap.event, EVENT)
    assert result is not None and result[0] == EXPECTED


def test_event_already_carrying_the_public_id(benchmark) -> None:
    swap = ModelSwap(PUBLIC)
    result = benchmark(swap.event, EXPECTED)
    assert result is not None and result[0] is EXPECTED


def test_rewrite_json_body(benchmark) -> None:
    rewritten = benchmark(rewrite_json_body, BODY, PUBLIC)
    assert json.loads(rewritten.body)["model"] == PUBLIC
    assert rewritten.upstream_model == UPSTREAM
