"""Every failure ends in an explicit OpenAI-shaped error: bad input, dead or slow backends,
backends dying mid-stream, clients going away."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap

import openai
import pytest
from aiohttp import web

from tests.gateway.backend import Received, chunk, sse, start_sse


def config(url: str, **timeouts: float) -> dict:
    endpoint: dict = {"url": url, "apiKey": "sk-test-backend-key-1", "actualModelName": "real"}
    if timeouts:
        endpoint["timeouts"] = timeouts
    return {"endpoints": {"llama": endpoint}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_error_shape(body: dict) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- bad requests ------------------------------------------------------------------------


async def test_unknown_model_404_lists_models(make_gateway, backend) -> None:
    gw = await make_gateway(config(backend.url))
    with pytest.raises(openai.NotFoundError) as caught:
        await gw.openai().chat.completions.create(model="gpt-9", messages=[])
    error = caught.value.body
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "'gpt-9'" in error["message"] and "llama" in error["message"]
    assert backend.received == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "llama", "messages": [', "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"messages": []}', "missing_model"),
        (b"", "missing_model"),
        (b'{"model": 42}', "invalid_model"),
        (b'{"model": ""}', "invalid_model"),
    ],
)
async def test_bad_bodies_are_400(make_gateway, backend, http, body, code) -> None:
    gw = await make_gateway(config(backend.url))
    async with http.post(
        gw.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        error = assert_error_shape(await response.json())
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert backend.received == []


# --- backends that fail before answering ---------------------------------------------------


async def test_backend_refusing_connections_is_502(make_gateway) -> None:
    gw = await make_gateway(config(f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(openai.APIStatusError) as caught:
        await gw.openai().chat.completions.create(model="llama", messages=[])
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "refused"
    assert "llama" in caught.value.body["message"]


async def test_backend_not_accepting_connections_hits_connect_timeout(make_gateway) -> None:
    """A listener whose accept queue is full drops new SYNs, so connect() hangs: the
    connect timeout must fire rather than the request waiting forever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; never accepted
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.2)
        gw = await make_gateway(config(f"http://127.0.0.1:{port}/v1", connect=0.5))
        with pytest.raises(openai.APIStatusError) as caught:
            await asyncio.wait_for(
                gw.openai().chat.completions.create(model="llama", messages=[]), 10
            )
        assert caught.value.status_code == 504
        assert caught.value.body["code"] == "timeout_connect"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_backend_slow_to_answer_is_504(make_gateway, backend) -> None:
    async def handler(request: web.Request, received: Received) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    backend.handler = handler
    gw = await make_gateway(config(backend.url, firstByte=0.5))
    with pytest.raises(openai.APIStatusError) as caught:
        await gw.openai().chat.completions.create(model="llama", messages=[])
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "timeout_first_byte"
    await asyncio.wait_for(backend.cancelled.wait(), 5)


async def test_backend_that_accepts_and_never_answers_times_out(make_gateway) -> None:
    """Not even a status line: the first-byte timeout still fires."""
    connections = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read(65536)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(config(f"http://127.0.0.1:{port}/v1", firstByte=0.5))
        with pytest.raises(openai.APIStatusError) as caught:
            await gw.openai().chat.completions.create(model="llama", messages=[], stream=True)
        assert caught.value.status_code == 504
        assert connections
    finally:
        server.close()
        for writer in connections:
            writer.close()


async def test_backend_speaking_garbage_is_502(make_gateway) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(config(f"http://127.0.0.1:{port}/v1"))
        with pytest.raises(openai.APIStatusError) as caught:
            await gw.openai().chat.completions.create(model="llama", messages=[])
        assert caught.value.status_code == 502
        assert caught.value.body["code"] == "bad_response"
    finally:
        server.close()


async def test_backend_errors_pass_through_with_their_body(make_gateway, backend) -> None:
    answers = iter(
        [
            (
                400,
                {
                    "error": {
                        "message": "max_tokens too big",
                        "type": "invalid_request_error",
                        "param": "max_tokens",
                        "code": None,
                    }
                },
            ),
            (
                503,
                {
                    "error": {
                        "message": "overloaded",
                        "type": "server_error",
                        "param": None,
                        "code": "overloaded",
                    }
                },
            ),
        ]
    )

    async def handler(request: web.Request, received: Received) -> web.Response:
        status, body = next(answers)
        return web.json_response(body, status=status, headers={"Retry-After": "3"})

    backend.handler = handler
    gw = await make_gateway({**config(backend.url), "retries": 0})  # this backend's answers, as is
    with pytest.raises(openai.BadRequestError) as bad:
        await gw.openai().chat.completions.create(model="llama", messages=[])
    assert bad.value.body["message"] == "max_tokens too big"
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.InternalServerError) as overloaded:
        await gw.openai().chat.completions.create(model="llama", messages=[])
    assert overloaded.value.status_code == 503
    assert overloaded.value.body["code"] == "overloaded"
    assert overloaded.value.response.headers["Retry-After"] == "3"


async def test_backend_html_error_page_is_wrapped(make_gateway, backend, http) -> None:
    async def handler(request: web.Request, received: Received) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    backend.handler = handler
    gw = await make_gateway(config(backend.url))
    async with http.post(gw.url + "/v1/chat/completions", json={"model": "llama"}) as response:
        assert response.status == 502
        error = assert_error_shape(await response.json())
    assert "Bad Gateway" in error["message"]


async def test_backend_error_echoing_our_key_is_redacted(make_gateway, backend, http) -> None:
    async def handler(request: web.Request, received: Received) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        return web.json_response({"error": {"message": f"Invalid key {key}"}}, status=401)

    backend.handler = handler
    gw = await make_gateway(config(backend.url))
    async with http.post(gw.url + "/v1/chat/completions", json={"model": "llama"}) as response:
        assert response.status == 401
        text = await response.text()
    assert "sk-test-backend-key-1" not in text
    assert "sk-...ey-1" in text


# --- failures after the stream started ----------------------------------------------------


async def test_backend_dying_mid_stream_ends_with_error_event(make_gateway, backend, http) -> None:
    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("real", "partial")))
        await asyncio.sleep(0.1)
        request.transport.close()  # the connection drops without ending the chunked body
        await asyncio.sleep(1)
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend.url))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        assert response.status == 200
        body = await response.read()
    events = body.split(b"\n\n")
    assert json.loads(events[0][6:])["model"] == "llama"
    error = json.loads(events[1][6:])["error"]
    assert error["code"] == "died" and error["type"] == "upstream_error"
    assert b"[DONE]" not in body


async def test_sdk_sees_mid_stream_death_as_an_error(make_gateway, backend) -> None:
    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("real", "partial")))
        await asyncio.sleep(0.1)
        request.transport.close()
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend.url))
    stream = await gw.openai().chat.completions.create(model="llama", messages=[], stream=True)
    seen = []
    with pytest.raises(openai.APIError):
        async for item in stream:
            seen.append(item)
    assert [c.model for c in seen] == ["llama"]


async def test_backend_process_killed_mid_stream(make_gateway, http, tmp_path) -> None:
    port = free_port()
    script = tmp_path / "backend.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, json, sys
            from aiohttp import web

            async def chat(request):
                response = web.StreamResponse(headers={{"Content-Type": "text/event-stream"}})
                await response.prepare(request)
                event = {{"model": "real", "choices": [{{"index": 0, "delta": {{"content": "x"}}}}]}}
                await response.write(b"data: " + json.dumps(event).encode() + b"\\n\\n")
                print("streaming", flush=True)
                await asyncio.sleep(60)
                return response

            app = web.Application()
            app.router.add_post("/v1/chat/completions", chat)
            web.run_app(app, host="127.0.0.1", port={port}, print=lambda *_: print("up", flush=True))
            """
        )
    )
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "up"
        gw = await make_gateway(config(f"http://127.0.0.1:{port}/v1"))
        async with http.post(
            gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
        ) as response:
            first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
            assert json.loads(first[6:])["model"] == "llama"
            process.kill()
            rest = await asyncio.wait_for(response.read(), 10)
        error = json.loads(rest.split(b"\n\n")[0][6:])["error"]
        assert error["code"] == "died"
        assert b"[DONE]" not in rest
    finally:
        process.kill()
        process.wait()


async def test_stalled_stream_hits_idle_timeout(make_gateway, backend, http) -> None:
    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("real", "one")))
        await asyncio.sleep(30)
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend.url, idle=0.5))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        body = await asyncio.wait_for(response.read(), 10)
    events = body.split(b"\n\n")
    assert json.loads(events[1][6:])["error"]["code"] == "timeout_idle"
    assert b"[DONE]" not in body
    await asyncio.wait_for(backend.cancelled.wait(), 5)


async def test_total_timeout_cuts_an_endless_stream(make_gateway, backend, http) -> None:
    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        while True:
            await response.write(sse(chunk("real", "more")))
            await asyncio.sleep(0.05)

    backend.handler = handler
    gw = await make_gateway(config(backend.url, total=1.0))
    async with http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    ) as response:
        body = await asyncio.wait_for(response.read(), 10)
    last = body.rstrip(b"\n").split(b"\n\n")[-1]
    assert json.loads(last[6:])["error"]["code"] == "timeout_total"


# --- clients that go away -------------------------------------------------------------------


async def test_client_disconnect_mid_stream_cancels_backend(make_gateway, backend, http) -> None:
    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        for _ in range(600):
            await response.write(sse(chunk("real", "tok")))
            await asyncio.sleep(0.05)
        return response

    backend.handler = handler
    gw = await make_gateway(config(backend.url))
    response = await http.post(
        gw.url + "/v1/chat/completions", json={"model": "llama", "stream": True}
    )
    await response.content.readuntil(b"\n\n")
    response.close()  # the client goes away
    await asyncio.wait_for(backend.cancelled.wait(), 5)


async def test_client_disconnect_before_answer_cancels_backend(make_gateway, backend, http) -> None:
    """Non-streaming too: the backend must not go on generating for nobody."""

    async def handler(request: web.Request, received: Received) -> web.Response:
        await asyncio.sleep(60)
        return web.json_response({})

    backend.handler = handler
    gw = await make_gateway(config(backend.url))
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.5):
            await http.post(gw.url + "/v1/chat/completions", json={"model": "llama"})
    await asyncio.wait_for(backend.cancelled.wait(), 5)
