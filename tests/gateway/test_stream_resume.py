"""Stream resume: a backend that dies mid-stream is replaced by another, and the client sees
one unbroken stream; a stream that cannot be resumed ends with the error event as before."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.gateway.story import (
    PIECES,
    Script,
    StoryBackend,
    completion_prompt,
    story_text,
)

REPO = Path(__file__).resolve().parents[2]
SEED = "Tell me a story"


@pytest.fixture
async def stories() -> AsyncIterator[list[StoryBackend]]:
    started = [await StoryBackend().start() for _ in range(3)]
    yield started
    for backend in started:
        await backend.stop()


def config(backends: list[StoryBackend], **endpoint: Any) -> dict[str, Any]:
    """Backends in priority order: the first gets the stream, the next the continuation."""
    return {
        "endpoints": {
            "story": {
                "strategy": "priority",
                "resume": True,
                "backends": [{"url": b.url} for b in backends],
                **endpoint,
            }
        },
        "timeouts": {"idle": 0.5},
        "circuitBreaker": {"failures": 100, "cooldown": 30},
    }


async def read_stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    """Every `data:` payload of the response, `[DONE]` as the string."""
    events: list[Any] = []
    async with http.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def chat_text(events: list[Any]) -> str:
    return "".join(
        c["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict)
        for c in e.get("choices", ())
    )


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "story",
        "messages": [{"role": "user", "content": SEED}],
        "stream": True,
        **extra,
    }


@pytest.mark.parametrize("how", ["cut", "torn", "stall"])
async def test_a_dead_stream_goes_on_elsewhere_and_reads_as_one(
    make_gateway, stories, http, how: str
) -> None:
    first, second, _ = stories
    first.script = Script(die_after=7, die_how=how)
    gw = await make_gateway(config(stories))
    body = chat_body(max_tokens=100, stream_options={"include_usage": True})
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", body)
    assert chat_text(events) == story_text(SEED)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [e for e in events if isinstance(e, dict)]
    assert not any("error" in c for c in chunks)
    assert len({(c["id"], c["created"], c["system_fingerprint"]) for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {"story"}
    roles = [c["choices"][0]["delta"].get("role") for c in chunks if c["choices"]]
    assert [r for r in roles if r] == ["assistant"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["stop"]
    # The original prompt's 10 tokens; the completion summed over both parts.
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": PIECES,
        "total_tokens": 10 + PIECES,
    }
    continued = second.received[-1]
    assert continued["messages"][-1] == {"role": "assistant", "content": "".join(_pieces(7))}
    assert continued["continue_final_message"] is True
    assert continued["add_generation_prompt"] is False
    assert continued["max_tokens"] == 100 - 7


def _pieces(n: int) -> list[str]:
    from tests.gateway.story import story

    return story(SEED)[:n]


async def test_the_openai_sdk_sees_one_normal_stream(make_gateway, stories) -> None:
    stories[0].script = Script(die_after=3)
    gw = await make_gateway(config(stories))
    client = gw.openai()
    stream = await client.chat.completions.create(
        model="story",
        messages=[{"role": "user", "content": SEED}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == story_text(SEED)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == PIECES


async def test_a_cut_text_completion_goes_on_after_the_prompt(make_gateway, stories, http) -> None:
    stories[0].script = Script(die_after=12)
    gw = await make_gateway(config(stories))
    body = {"model": "story", "prompt": completion_prompt(SEED), "stream": True, "max_tokens": 50}
    events = await read_stream(http, f"{gw.url}/v1/completions", body)
    text = "".join(c["choices"][0]["text"] for c in events if isinstance(c, dict) and c["choices"])
    assert text == story_text(SEED)
    assert events[-1] == "[DONE]"
    assert len({c["id"] for c in events if isinstance(c, dict)}) == 1
    assert (
        stories[1].received[-1]["prompt"].startswith(completion_prompt(SEED) + "".join(_pieces(12)))
    )
    assert stories[1].received[-1]["max_tokens"] == 50 - 12


async def test_a_stream_cut_twice_is_resumed_twice(make_gateway, stories, http, capsys) -> None:
    stories[0].script = Script(die_after=4)
    stories[1].script = Script(die_after=5)
    gw = await make_gateway(config(stories))
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", chat_body())
    assert chat_text(events) == story_text(SEED)
    assert events[-1] == "[DONE]"
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "seams" in line]
    access = [line for line in lines if line.get("path") == "/v1/chat/completions"]
    assert access[-1]["seams"] == [
        {"backend": f"127.0.0.1:{stories[0].port}", "completion_tokens": 4},
        {"backend": f"127.0.0.1:{stories[1].port}", "completion_tokens": 9},
    ]
    assert access[-1]["error"] is None and access[-1]["failures"] == ["died", "died"]
    assert access[-1]["completion_tokens"] == PIECES
    metrics = await (await http.get(f"{gw.url}/metrics")).text()
    assert 'gateway_stream_resumes_total{model="story",outcome="resumed",reason=""} 2.0' in metrics
    debug = await (await http.get(f"{gw.url}/debug")).json()
    assert debug["streamResumes"]["resumed"] == 2


async def test_a_continuation_failing_before_its_first_event_is_failed_over(
    make_gateway, stories, http
) -> None:
    first, second, third = stories
    first.script = Script(die_after=6)
    second.script = Script(fail_status=503)
    gw = await make_gateway(config(stories))
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", chat_body())
    assert chat_text(events) == story_text(SEED)
    assert events[-1] == "[DONE]"
    assert second.received and third.received[-1]["continue_final_message"] is True


def _ends_with_error(events: list[Any]) -> bool:
    return (
        "[DONE]" not in events
        and isinstance(events[-1], dict)
        and set(events[-1]["error"]) == {"message", "type", "param", "code"}
    )


@pytest.mark.parametrize(
    ("endpoint", "script", "extra", "reason"),
    [
        ({"resume": False}, {}, {}, "not_enabled"),
        ({"maxResumes": 0}, {}, {}, "max_resumes"),
        (
            {},
            {
                "extra_delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": ""},
                        }
                    ]
                }
            },
            {},
            "tool_calls",
        ),
        ({}, {"extra_delta": {"function_call": {"name": "f", "arguments": ""}}}, {}, "tool_calls"),
        ({}, {"extra_delta": {"reasoning_content": "hmm"}}, {}, "reasoning"),
        ({}, {"extra_delta": {"reasoning": "hmm"}}, {}, "reasoning"),
        ({}, {}, {"n": 2}, "n"),
        ({}, {}, {"logprobs": True}, "logprobs"),
    ],
)
async def test_streams_that_cannot_be_resumed_end_with_the_error_event(
    make_gateway, stories, http, endpoint, script, extra, reason
) -> None:
    stories[0].script = Script(die_after=4, **script)
    gw = await make_gateway(config(stories, **endpoint))
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", chat_body(**extra))
    assert _ends_with_error(events)
    assert len(stories[1].received) == 0  # nothing was continued
    if reason != "not_enabled":  # a route without resume does not count refusals
        metrics = await (await http.get(f"{gw.url}/metrics")).text()
        expected = (
            f'gateway_stream_resumes_total{{model="story",outcome="refused",reason="{reason}"}} 1.0'
        )
        assert expected in metrics


async def test_a_backend_without_resume_is_not_continued(make_gateway, stories, http) -> None:
    stories[0].script = Script(die_after=4)
    cfg = config(stories)
    cfg["endpoints"]["story"]["backends"][0]["resume"] = False
    gw = await make_gateway(cfg)
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", chat_body())
    assert _ends_with_error(events)
    assert len(stories[1].received) == 0


async def test_no_other_backend_ends_with_the_error_event(
    make_gateway, stories, http, capsys
) -> None:
    stories[0].script = Script(die_after=4)
    gw = await make_gateway(config(stories[:1]))
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", chat_body())
    assert _ends_with_error(events)
    assert len(stories[0].received) == 1  # the backend that died is not asked to continue
    access = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "seams" in line]
    assert (access[-1]["error"], access[-1]["failures"], access[-1]["seams"]) == (
        "died",
        ["died"],
        None,
    )


async def test_more_seams_than_max_resumes_end_with_the_error_event(
    make_gateway, stories, http
) -> None:
    for backend in stories:
        backend.script = Script(die_after=3)
    gw = await make_gateway(config(stories, maxResumes=1))
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", chat_body())
    assert _ends_with_error(events)
    assert chat_text(events) == "".join(_pieces(6))  # two parts of 3, then the end
    assert len(stories[2].received) == 0


async def test_a_continuation_failing_everywhere_ends_with_the_error_event(
    make_gateway, stories, http
) -> None:
    stories[0].script = Script(die_after=4)
    stories[1].script = Script(fail_status=500)
    stories[2].script = Script(fail_status=502)
    gw = await make_gateway(config(stories))
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", chat_body())
    assert _ends_with_error(events)
    metrics = await (await http.get(f"{gw.url}/metrics")).text()
    assert 'gateway_stream_resumes_total{model="story",outcome="failed"' in metrics
    # The cut once, and each attempt at a continuation (retries: 2, so B, C, then B again).
    errors = {line for line in metrics.splitlines() if line.startswith("gateway_upstream_errors_t")}
    assert errors == {
        'gateway_upstream_errors_total{kind="died",model="story"} 1.0',
        'gateway_upstream_errors_total{kind="http_500",model="story"} 2.0',
        'gateway_upstream_errors_total{kind="http_502",model="story"} 1.0',
    }


async def test_a_stream_past_its_total_timeout_is_not_resumed(make_gateway, stories, http) -> None:
    stories[0].script = Script(die_after=4, die_how="stall")
    cfg = config(stories)
    cfg["timeouts"] = {"idle": None, "total": 0.5}
    gw = await make_gateway(cfg)
    events = await read_stream(http, f"{gw.url}/v1/chat/completions", chat_body())
    assert _ends_with_error(events)
    assert events[-1]["error"]["code"] == "timeout_total"
    assert len(stories[1].received) == 0


# --------------------------------------------------------------------------------------------
# 200 streams over three backend processes, one of them killed
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _until_listening(port: int) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


async def test_200_streams_survive_a_killed_backend_process(make_gateway, http) -> None:
    ports = [_free_port() for _ in range(3)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.gateway.story", "--port", str(p)], cwd=REPO, env=env
        )
        for p in ports
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(_until_listening(p) for p in ports)), 30)
        for port in ports:
            async with http.post(f"http://127.0.0.1:{port}/_script", json={"interval": 0.02}):
                pass
        backends = [{"url": f"http://127.0.0.1:{p}/v1"} for p in ports]
        gw = await make_gateway(
            {
                "endpoints": {"story": {"resume": True, "backends": backends}},
                "timeouts": {"idle": 5},
            }
        )
        url = f"{gw.url}/v1/chat/completions"
        seeds = [f"story number {i} 40" for i in range(200)]
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        ) as client:
            tasks = [
                asyncio.create_task(
                    read_stream(
                        client, url, {**chat_body(), "messages": [{"role": "user", "content": s}]}
                    )
                )
                for s in seeds
            ]
            victim = f"http://127.0.0.1:{ports[0]}/_stats"
            while True:  # kill it once it is in the middle of streams
                async with http.get(victim) as r:
                    if (await r.json())["pieces"] >= 100:
                        break
                await asyncio.sleep(0.02)
            procs[0].send_signal(signal.SIGKILL)
            results = await asyncio.gather(*tasks)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    cut = [i for i, events in enumerate(results) if events[-1] != "[DONE]"]
    wrong = [i for i, events in enumerate(results) if chat_text(events) != story_text(seeds[i])]
    assert (cut, wrong) == ([], [])
