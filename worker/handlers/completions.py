"""POST /v1/chat/completions and /v1/completions, streaming (SSE) and not."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from wire.errors import RATE_LIMIT, SERVER_ERROR, APIError, error_payload
from wire.sse import DONE_EVENT, encode_data
from worker.engine import EngineError, EngineUnavailable, QueueFull
from worker.generation import TextStream, merge
from worker.handlers.common import check_model, parse, read_json, ready_state
from worker.handlers.render import ChoiceRenderer, usage_of
from worker.prompts import PromptError, chat_prompt_ids, text_prompt_ids
from worker.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from worker.sampling import SamplingParams
from worker.state import WorkerState

log = structlog.get_logger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def sampling_params(
    req: SamplingFields, max_tokens: int | None, prompt_len: int, max_model_len: int, param: str
) -> SamplingParams:
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt is {prompt_len} tokens, which leaves no room for a completion.",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = room
    elif prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        ignore_eos=req.ignore_eos,
    )


def _start(
    state: WorkerState, prompt_ids: list[int], params: SamplingParams, stops: list[str]
) -> TextStream:
    assert state.engine is not None and state.loaded is not None
    try:
        return TextStream(state.engine, state.loaded.tokenizer, prompt_ids, params, stops)
    except QueueFull as exc:
        state.metrics.rejected.inc()
        raise APIError(
            503,
            f"The worker is at capacity: {exc}. Retry shortly.",
            RATE_LIMIT,
            None,
            "queue_full",
            {"Retry-After": "1"},
        ) from None
    except EngineUnavailable as exc:
        raise APIError(503, str(exc), SERVER_ERROR, None, "unavailable") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = ready_state(request)
    assert state.loaded is not None
    req = parse(ChatCompletionRequest, await read_json(request))
    check_model(state, req.model)
    try:
        prompt_ids = chat_prompt_ids(
            state.loaded.tokenizer,
            req.messages,
            req.add_generation_prompt,
            req.continue_final_message,
        )
    except PromptError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_prompt") from None
    params = sampling_params(
        req, req.requested_max_tokens, len(prompt_ids), state.loaded.max_model_len, "messages"
    )
    renderer = ChoiceRenderer(True, req.model)
    prompts, choice_params = _choices([prompt_ids], [params], req.n)
    return await _serve(request, state, req, prompts, choice_params, renderer, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    state = ready_state(request)
    assert state.loaded is not None
    req = parse(CompletionRequest, await read_json(request))
    check_model(state, req.model)
    try:
        prompts = [text_prompt_ids(state.loaded.tokenizer, p) for p in req.prompts()]
    except (PromptError, ValueError) as exc:
        raise APIError(400, str(exc), param="prompt", code="invalid_prompt") from None
    max_len = state.loaded.max_model_len
    params = [
        sampling_params(req, req.requested_max_tokens, len(p), max_len, "prompt") for p in prompts
    ]
    renderer = ChoiceRenderer(False, req.model)
    prompts, params = _choices(prompts, params, req.n)
    return await _serve(request, state, req, prompts, params, renderer, "completions")


def _choices(
    prompts: list[list[int]], params: list[SamplingParams], n: int
) -> tuple[list[list[int]], list[SamplingParams]]:
    """`n` choices per prompt, grouped by prompt as OpenAI orders them. Each choice gets its
    own seed (seed + i), so seeded choices differ from each other yet repeat exactly."""
    out_prompts, out_params = [], []
    for prompt_ids, sp in zip(prompts, params, strict=True):
        for i in range(n):
            out_prompts.append(prompt_ids)
            seed = None if sp.seed is None else sp.seed + i
            out_params.append(dataclasses.replace(sp, seed=seed))
    return out_prompts, out_params


async def _serve(
    request: web.Request,
    state: WorkerState,
    req: SamplingFields,
    prompts: list[list[int]],
    params: list[SamplingParams],
    renderer: ChoiceRenderer,
    endpoint: str,
) -> web.StreamResponse:
    started = time.perf_counter()
    on_first = _first_token_timer(state, started)
    streams: list[TextStream] = []
    try:
        # Admit every choice before answering, so a full queue is a plain 503.
        for prompt_ids, sp in zip(prompts, params, strict=True):
            streams.append(_start(state, prompt_ids, sp, req.stops))
        if req.stream:
            return await _stream(request, req, streams, renderer, on_first)
        texts = await asyncio.gather(*(_collect(s, on_first) for s in streams))
    except EngineError as exc:
        log.error("generation_failed", error=str(exc))
        raise APIError(
            500, "Generation failed; it has been logged.", SERVER_ERROR, None, "engine_error"
        ) from None
    finally:
        for s in streams:
            await s.aclose()
        _account(state, streams, endpoint, started)
    usage = usage_of(
        sum(s.prompt_tokens for s in streams), sum(s.completion_tokens for s in streams)
    )
    request["usage"] = usage
    return web.json_response(renderer.body(list(texts), [s.finish_reason for s in streams], usage))


def _first_token_timer(state: WorkerState, started: float) -> Callable[[], None]:
    seen = False

    def mark() -> None:
        nonlocal seen
        if not seen:
            seen = True
            state.metrics.ttft.observe(time.perf_counter() - started)

    return mark


async def _collect(stream: TextStream, on_first: Callable[[], None]) -> str:
    parts = []
    async for delta in stream:
        if delta.completion_tokens:
            on_first()
        parts.append(delta.text)
    return "".join(parts)


def _account(state: WorkerState, streams: list[TextStream], endpoint: str, started: float) -> None:
    m = state.metrics
    m.latency.labels(endpoint).observe(time.perf_counter() - started)
    for s in streams:
        m.prompt_tokens.inc(s.prompt_tokens)
        m.generated_tokens.inc(s.completion_tokens)
        if s.finish_reason is None:
            m.cancelled.inc()


async def _stream(
    request: web.Request,
    req: SamplingFields,
    streams: list[TextStream],
    renderer: ChoiceRenderer,
    on_first: Callable[[], None],
) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    with_usage = req.include_usage

    async def send(choice: dict[str, Any]) -> None:
        await resp.write(encode_data(renderer.chunk(choice, None, with_usage)))

    if renderer.chat:
        for index in range(len(streams)):
            await send(renderer.delta("", None, first=True, index=index))
    try:
        async for index, delta in merge(streams):
            if delta.completion_tokens:
                on_first()
            if delta.text:
                await send(renderer.delta(delta.text, None, index=index))
            if delta.finish_reason:
                empty = None if renderer.chat else ""
                await send(renderer.delta(empty, delta.finish_reason, index=index))
    except EngineError as exc:
        # After the first byte the status is sent: end with an error event and no [DONE],
        # so the client can tell a cut stream from a finished one.
        log.error("generation_failed", error=str(exc))
        error = error_payload("Generation failed.", SERVER_ERROR, None, "engine_error")
        await resp.write(encode_data(error))
        return resp
    usage = usage_of(
        sum(s.prompt_tokens for s in streams), sum(s.completion_tokens for s in streams)
    )
    request["usage"] = usage
    if with_usage:
        await resp.write(encode_data(renderer.chunk(None, usage, True)))
    await resp.write(DONE_EVENT)
    await resp.write_eof()
    return resp
