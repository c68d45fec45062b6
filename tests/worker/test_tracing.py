"""The worker's traces: with an OTLP endpoint set, each model request is a server span by the
GenAI conventions that continues the caller's traceparent, so one trace runs from the client
through the gateway into the engine. Received by a real OTLP/HTTP receiver."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from gateway.app import build_app
from gateway.server import bound_port, start
from tests.otlp_receiver import OTLPReceiver
from tests.worker.conftest import WorkerProcess, start_worker, wait_ready

SERVER, CLIENT = 2, 3
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
PROMPT = "PROMPT-TEXT-never-in-a-worker-span"


@pytest.fixture
async def receiver() -> AsyncIterator[OTLPReceiver]:
    server = await OTLPReceiver().start()
    yield server
    await server.stop()


@pytest.fixture
def traced_worker(tmp_path: Path, demo_cache: Path, receiver: OTLPReceiver):
    worker = start_worker(
        tmp_path / "traced.log",
        demo_cache,
        "--model", "demo",
        "--max-batch-size", "4",
        "--max-model-len", "256",
        extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "20"},
    )  # fmt: skip
    try:
        wait_ready(worker)
        yield worker
    finally:
        worker.stop()


def worker_spans(receiver: OTLPReceiver):
    return [s for s in receiver.spans if s.resource.get("service.name") == "llm-worker"]


async def test_the_worker_continues_the_callers_trace_alone_and_behind_the_gateway(
    traced_worker: WorkerProcess, receiver: OTLPReceiver, tmp_path: Path, monkeypatch
) -> None:
    """One worker process for both parts: starting one costs seconds."""
    async with openai.AsyncOpenAI(
        base_url=traced_worker.base_url,
        api_key="unused",
        max_retries=0,
        default_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    ) as client:
        stream = await client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            max_tokens=8,
            temperature=0.7,
            top_p=0.95,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None

    (span,) = await receiver.wait_for(1)
    assert span.kind == SERVER and span.name == "chat demo"
    assert (span.trace_id, span.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert span.resource["service.name"] == "llm-worker"
    attributes = span.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "demo"
    assert attributes["gen_ai.request.max_tokens"] == 8
    assert attributes["gen_ai.request.temperature"] == 0.7
    assert attributes["gen_ai.request.top_p"] == 0.95
    assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert attributes["http.response.status_code"] == 200
    assert span.events == ["gen_ai.first_token"]
    sent = b"".join(receiver.bodies)
    assert PROMPT.encode() not in sent
    if len(text) > 8:  # the demo model's gibberish, when long enough to be unambiguous
        assert text.encode() not in sent

    # Behind the gateway: client -> gateway server span -> its attempt -> the worker's span.
    receiver.spans.clear()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    config = tmp_path / "gateway.json"
    endpoint = {"url": traced_worker.base_url, "actualModelName": "demo"}
    config.write_text(json.dumps({"endpoints": {"local": endpoint}}))
    runner = await start(build_app(config, watch=False), "127.0.0.1", 0)
    try:
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{bound_port(runner)}/v1",
            api_key="unused",
            max_retries=0,
            default_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        ) as client:
            await client.completions.create(model="local", prompt=PROMPT, max_tokens=4)
        spans = await receiver.wait_for(3)
    finally:
        await runner.cleanup()
    gateway = {s.kind: s for s in spans if s.resource["service.name"] == "llm-gateway"}
    (worker,) = worker_spans(receiver)
    assert gateway[SERVER].name == "text_completion local"
    assert gateway[CLIENT].name == "text_completion demo"
    assert worker.name == "text_completion demo"
    # one trace, each span the child of the one before
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}
    assert gateway[SERVER].parent_span_id == CLIENT_SPAN
    assert gateway[CLIENT].parent_span_id == gateway[SERVER].span_id
    assert worker.parent_span_id == gateway[CLIENT].span_id
    assert (
        worker.attributes["gen_ai.usage.input_tokens"]
        == (gateway[SERVER].attributes["gen_ai.usage.input_tokens"])
    )
    assert PROMPT.encode() not in b"".join(receiver.bodies)
