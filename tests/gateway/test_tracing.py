"""OpenTelemetry traces: the real OTLP/HTTP exporter sends its batches to a real receiver on
loopback (tests/otlp_receiver.py), which decodes them with opentelemetry-proto. Spans follow
the GenAI conventions, continue the client's trace, hand each backend its attempt's
traceparent, and never carry prompts, completions, keys or secret header values. A collector
that is down or hangs changes nothing for requests; what it costs is counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai
import pytest
from aiohttp import web

from gateway.state import METRICS, TRACER
from tests.gateway.backend import Received, chunk, sse, start_sse
from tests.gateway.configs import KEY, config, multi
from tests.gateway.test_failures import free_port
from tests.gateway.waiting import until
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
ERROR = 2  # Status.StatusCode
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PROMPT = "PROMPT-TEXT-never-in-a-span"
COMPLETION = "COMPLETION-TEXT-never-in-a-span"
CLIENT_KEY = "sk-client-alice-0123456789"
SECRET_HEADER = "tok-9876543210-secret"


@pytest.fixture
async def receiver(monkeypatch) -> AsyncIterator[OTLPReceiver]:
    """A collector, and the gateway's environment pointing at it (batches every 20 ms)."""
    server = await OTLPReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    yield server
    await server.stop()


async def streaming_completion(request: web.Request, received: Received) -> web.StreamResponse:
    payload = received.json()
    response = await start_sse(request)
    await response.write(sse(chunk(payload["model"], COMPLETION)))
    await response.write(sse(chunk(payload["model"], None, "stop")))
    usage = {**chunk(payload["model"], None), "choices": []}
    usage["usage"] = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    await response.write(sse(usage))
    await response.write(b"data: [DONE]\n\n")
    return response


async def unavailable(request: web.Request, received: Received) -> web.Response:
    return web.json_response({"error": {"message": "busy"}}, status=503)


def traceparent(header: str) -> tuple[str, str, bool]:
    """Trace id, parent span id and the sampled flag of a W3C traceparent."""
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


def by_kind(spans: list[ReceivedSpan], kind: int) -> list[ReceivedSpan]:
    return [s for s in spans if s.kind == kind]


async def test_a_request_is_one_server_span_with_a_client_span_per_attempt(
    make_gateway, make_backend, receiver
) -> None:
    failing, good = await make_backend(), await make_backend()
    failing.handler, good.handler = unavailable, streaming_completion
    cfg = multi(failing.url, good.url, strategy="priority", actualModelName="real-model")
    for backend in cfg["endpoints"]["m"]["backends"]:
        backend.update(apiKey=KEY, headers={"X-Backend-Token": SECRET_HEADER})
    cfg["keys"] = [{"name": "alice", "key": CLIENT_KEY}]
    gw = await make_gateway(cfg)
    client = gw.openai(
        api_key=CLIENT_KEY,
        default_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        max_tokens=16,
        temperature=0.5,
        top_p=0.9,
    )
    assert COMPLETION in "".join(
        [c.choices[0].delta.content or "" async for c in stream if c.choices]
    )

    spans = await receiver.wait_for(3)
    (server,) = by_kind(spans, SERVER)
    retried, answered = by_kind(spans, CLIENT)
    # The client's trace continued: same trace id, the client's span as parent.
    assert server.name == "chat m"
    assert (server.trace_id, server.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert server.resource["service.name"] == "llm-gateway"
    attributes = server.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "m"
    assert attributes["gen_ai.response.model"] == "real-model"
    assert attributes["gen_ai.usage.input_tokens"] == 11
    assert attributes["gen_ai.usage.output_tokens"] == 5
    assert attributes["gen_ai.request.max_tokens"] == 16
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.request.top_p"] == 0.9
    assert (attributes["server.address"], attributes["server.port"]) == ("127.0.0.1", good.port)
    assert attributes["http.response.status_code"] == 200
    assert attributes["gateway.key"] == "alice"
    assert attributes["gateway.attempts"] == 2
    assert "error.type" not in attributes and server.status_code != ERROR
    assert server.events == ["gen_ai.first_token"]

    # One client span per attempt, children of the server span, in the same trace.
    for attempt in (retried, answered):
        assert (attempt.trace_id, attempt.parent_span_id) == (CLIENT_TRACE, server.span_id)
        assert attempt.name == "chat real-model"
    assert retried.attributes["server.port"] == failing.port
    assert retried.attributes["gateway.outcome"] == "retried"
    assert retried.attributes["gateway.retry_reason"] == "http_503"
    assert retried.attributes["http.response.status_code"] == 503
    assert retried.attributes["error.type"] == "http_503" and retried.status_code == ERROR
    assert answered.attributes["server.port"] == good.port
    assert answered.attributes["gateway.outcome"] == "answered"
    assert answered.attributes["gateway.attempt"] == 2

    # Each backend got the traceparent of its own attempt's span.
    assert failing.last.headers["traceparent"] == f"00-{CLIENT_TRACE}-{retried.span_id}-01"
    assert good.last.headers["traceparent"] == f"00-{CLIENT_TRACE}-{answered.span_id}-01"

    # Nothing secret in any byte the collector received.
    sent = b"".join(receiver.bodies)
    for secret in (PROMPT, COMPLETION, CLIENT_KEY, KEY, SECRET_HEADER):
        assert secret.encode() not in sent, secret
    for headers in receiver.headers:
        assert not any(secret in str(headers) for secret in (CLIENT_KEY, KEY, SECRET_HEADER))


async def test_without_a_client_trace_the_request_starts_one(
    make_gateway, backend, receiver
) -> None:
    gw = await make_gateway(config(backend))
    await gw.openai().embeddings.create(model="llama", input="hi")
    server, attempt = sorted(await receiver.wait_for(2), key=lambda s: s.kind)
    assert server.name == "embeddings llama" and server.parent_span_id == ""
    assert attempt.parent_span_id == server.span_id
    sent = traceparent(backend.last.headers["traceparent"])
    assert sent == (server.trace_id, attempt.span_id, True)
    assert "gen_ai.first_token" not in server.events  # not a stream


async def test_a_failed_request_carries_its_error_kind(make_gateway, receiver) -> None:
    gw = await make_gateway(
        {"endpoints": {"gone": {"url": f"http://127.0.0.1:{free_port()}/v1"}}, "retries": 0}
    )
    with pytest.raises(openai.APIStatusError):
        await gw.openai().completions.create(model="gone", prompt=PROMPT)
    server, attempt = sorted(await receiver.wait_for(2), key=lambda s: s.kind)
    assert server.name == "text_completion gone"
    assert server.attributes["error.type"] == "refused" and server.status_code == ERROR
    assert server.attributes["http.response.status_code"] == 502
    assert attempt.attributes["gateway.outcome"] == "failed"
    assert attempt.attributes["error.type"] == "refused"
    assert PROMPT.encode() not in b"".join(receiver.bodies)


async def test_standard_variables_name_the_service_and_sample(
    make_gateway, backend, receiver, monkeypatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-gateway")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=collector-secret")
    gw = await make_gateway(config(backend))
    await gw.openai().chat.completions.create(model="llama", messages=[])
    spans = await receiver.wait_for(2)
    assert spans[0].resource["service.name"] == "edge-gateway"
    assert spans[0].resource["deployment.environment"] == "test"
    assert receiver.headers[0]["x-collector-token"] == "collector-secret"

    # A sampler that keeps nothing: no span is exported, the backend still gets a
    # traceparent (not sampled) so that its own spans stay out too.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    quiet = await make_gateway(config(backend), filename="quiet.json")
    await quiet.openai().chat.completions.create(model="llama", messages=[])
    assert traceparent(backend.last.headers["traceparent"])[2] is False
    await quiet.runner.cleanup()  # flushes whatever was queued
    assert len(receiver.spans) == 2


async def test_tracing_is_off_without_an_endpoint(make_gateway, backend, monkeypatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    gw = await make_gateway(config(backend))
    assert gw.app[TRACER] is None
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    client = gw.openai(default_headers={"traceparent": traceparent})
    await client.chat.completions.create(model="llama", messages=[])
    assert backend.last.headers["traceparent"] == traceparent  # passed through untouched
    assert b"trace_spans_dropped" not in gw.app[METRICS].render()


async def test_the_sdk_switch_and_the_traces_endpoint(make_gateway, backend, monkeypatch) -> None:
    receiver = await OTLPReceiver().start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint + "/v1/traces")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        assert (await make_gateway(config(backend))).app[TRACER] is None
        monkeypatch.delenv("OTEL_SDK_DISABLED")
        gw = await make_gateway(config(backend), filename="on.json")
        await gw.openai().chat.completions.create(model="llama", messages=[])
        assert len(await receiver.wait_for(2)) == 2
    finally:
        await receiver.stop()


def dropped(gw, reason: str) -> float:
    text = gw.app[METRICS].render().decode()
    line = f'gateway_trace_spans_dropped_total{{reason="{reason}"}} '
    found = [float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)]
    return found[0] if found else 0.0


@pytest.fixture
def tiny_queue(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")


async def test_a_collector_that_is_down_changes_nothing_for_requests(
    make_gateway, backend, monkeypatch, tiny_queue
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    gw = await make_gateway(config(backend))
    client = gw.openai()
    for _ in range(20):
        completion = await client.chat.completions.create(model="llama", messages=[])
        assert completion.model == "llama"
    # Spans beyond the bounded queue are dropped and counted, and so are failed batches.
    assert dropped(gw, "queue_full") > 0
    await until(lambda: dropped(gw, "export_failed") > 0, what="a failed export counted")


async def test_a_collector_that_hangs_changes_nothing_for_requests(
    make_gateway, backend, monkeypatch, tiny_queue
) -> None:
    async def never_answers(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/v1/traces", never_answers)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        gw = await make_gateway(config(backend))
        client = gw.openai()
        streams = 0
        for _ in range(20):
            stream = await client.chat.completions.create(model="llama", messages=[], stream=True)
            streams += len([c async for c in stream]) > 0
        assert streams == 20
        assert dropped(gw, "queue_full") > 0
    finally:
        await runner.cleanup()
