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
from wire.protocol import SSE_HEADERS, Usage, usage
from wire.sse import DONE_EVENT, encode_data
from worker.engine import EngineError, EngineUnavailable, QueueFull
from worker.generation import TextStream, merge
from worker.handlers.common import check_model, parse, read_json, ready_state
from worker.handlers.render import ChatRenderer, ChoiceRenderer, TextRenderer
from worker.prompts import PromptError, chat_prompt_ids, text_prompt_ids
from worker.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from worker.sampling import SamplingDefaults, SamplingParams
from worker.state import WorkerState

log = structlog.get_logger(__name__)


def sampling_params(
    req: SamplingFields,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    param: str,
    defaults: SamplingDefaults,
) -> SamplingParams:
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError.bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt is {prompt_len} tokens, which leaves no room for a completion.",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = room
    elif prompt_len + max_tokens > max_model_len:
        raise APIError.bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=defaults.top_k if req.top_k is None else max(0, req.top_k),
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
        raise APIError.unavailable(
            f"The worker is at capacity: {exc}. Retry shortly.",
            code="queue_full",
            retry_after=1,
            type_=RATE_LIMIT,  # load, not a fault: OpenAI's type for "slow down"
        ) from None
    except EngineUnavailable as exc:
        raise APIError.unavailable(str(exc), code="unavailable") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = ready_state(request)
    assert state.loaded is not None
    req = parse(ChatCompletionRequest, await read_json(request))
    check_model(state, req.model)
    try:
        prompt_ids = chat_prompt_ids(state.loaded.tokenizer, req.messages)
    except PromptError as exc:
        raise APIError.bad_request(str(exc), param=exc.param, code="invalid_prompt") from None
    params = sampling_params(
        req,
        req.requested_max_tokens,
        len(prompt_ids),
        state.loaded.max_model_len,
        "messages",
        state.loaded.sampling_defaults,
    )
    renderer = ChatRenderer(req.model)
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
        raise APIError.bad_request(str(exc), param="prompt", code="invalid_prompt") from None
    max_len, defaults = state.loaded.max_model_len, state.loaded.sampling_defaults
    params = [
        sampling_params(req, req.requested_max_tokens, len(p), max_len, "prompt", defaults)
        for p in prompts
    ]
    renderer = TextRenderer(req.model)
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
        raise APIError.internal(
            "Generation failed; it has been logged.", code="engine_error"
        ) from None
    finally:
        for s in streams:
            await s.aclose()
        _account(state, streams, endpoint, started)
    request["usage"] = used = _usage(streams)
    return web.json_response(renderer.body(list(texts), [s.finish_reason for s in streams], used))


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


def _usage(streams: list[TextStream]) -> Usage:
    return usage(sum(s.prompt_tokens for s in streams), sum(s.completion_tokens for s in streams))


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

    async def send(choice: Any) -> None:
        await resp.write(encode_data(renderer.chunk(choice, None, with_usage)))

    for index in range(len(streams)):
        opening = renderer.opening(index)
        if opening is not None:
            await send(opening)
    try:
        async for index, delta in merge(streams):
            if delta.completion_tokens:
                on_first()
            if delta.text:
                await send(renderer.delta(delta.text, index))
            if delta.finish_reason:
                await send(renderer.finish(delta.finish_reason, index))
    except EngineError as exc:
        # After the first byte the status is sent: end with an error event and no [DONE],
        # so the client can tell a cut stream from a finished one.
        log.error("generation_failed", error=str(exc))
        error = error_payload("Generation failed.", SERVER_ERROR, code="engine_error")
        await resp.write(encode_data(error))
        return resp
    request["usage"] = used = _usage(streams)
    if with_usage:
        await resp.write(encode_data(renderer.chunk(None, used, True)))
    await resp.write(DONE_EVENT)
    await resp.write_eof()
    return resp
