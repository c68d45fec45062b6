"""OpenAI response shapes, defined once for both servers: model cards and lists, usage, chat
and text completions and their stream chunks, embeddings, and the SSE response headers.

Typed builders rather than pydantic models: the worker builds one chunk per token, and a
builder is a dict literal, with the keys in OpenAI's order. The shapes follow the
`openai/openai-openapi` spec, which tests/worker/test_openapi_conformance.py holds them to;
where the spec contradicts OpenAI's own API, the API wins and the builder says why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Literal, NotRequired, TypedDict

# What a streamed answer is sent with: no cache may keep it, and an nginx in front must not
# buffer it (it would hold every event until its buffer fills).
NO_BUFFERING: Mapping[str, str] = MappingProxyType(
    {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
)
SSE_HEADERS: Mapping[str, str] = MappingProxyType(
    {"Content-Type": "text/event-stream", **NO_BUFFERING}
)


# --- /v1/models ---------------------------------------------------------------------------


class ModelCard(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    # The display name (the gateway's `displayName`): OpenAI clients ignore it, Open WebUI
    # shows it.
    name: NotRequired[str]
    # vLLM's extension: the context length the worker serves.
    max_model_len: NotRequired[int]


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelCard]


def model_card(
    model_id: str,
    *,
    created: int,
    owned_by: str,
    name: str | None = None,
    max_model_len: int | None = None,
) -> ModelCard:
    card: ModelCard = {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
    if name is not None:
        card["name"] = name
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


def model_list(cards: Iterable[ModelCard]) -> ModelList:
    return {"object": "list", "data": list(cards)}


# --- usage --------------------------------------------------------------------------------


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --- chat completions ---------------------------------------------------------------------


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None  # the spec requires the key: a string or null


class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    # Only with `stream_options.include_usage`: null on every chunk but the last, which has
    # no choices and the usage.
    usage: NotRequired[Usage | None]


def chat_choice(index: int, content: str, finish_reason: str | None) -> ChatChoice:
    return {
        "index": index,
        "message": {"role": "assistant", "content": content, "refusal": None},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def chat_completion(
    completion_id: str, created: int, model: str, choices: list[ChatChoice], usage: Usage
) -> ChatCompletion:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def first_chat_delta() -> ChatDelta:
    """The delta that opens each choice of a stream, as OpenAI sends it."""
    return {"role": "assistant", "content": "", "refusal": None}


def chat_chunk_choice(index: int, delta: ChatDelta, finish_reason: str | None) -> ChatChunkChoice:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    choices: list[ChatChunkChoice],
    *,
    include_usage: bool = False,
    usage: Usage | None = None,
) -> ChatCompletionChunk:
    """With `include_usage`, the chunk carries `usage` (null unless given); without, no key."""
    chunk: ChatCompletionChunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage
    return chunk


# --- text completions ---------------------------------------------------------------------


class TextChoice(TypedDict):
    index: int
    text: str
    logprobs: None
    # Null in a stream's chunks until the choice ends. The spec allows only a reason here,
    # stream or not (it describes chunks with the response's schema), but OpenAI's API sends
    # null, and clients (the openai SDK's `Completion.choices[].finish_reason`) expect it.
    finish_reason: str | None


class TextCompletion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: NotRequired[Usage | None]


def text_choice(index: int, text: str, finish_reason: str | None) -> TextChoice:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def text_completion(
    completion_id: str,
    created: int,
    model: str,
    choices: list[TextChoice],
    *,
    include_usage: bool = False,
    usage: Usage | None = None,
) -> TextCompletion:
    """A stream chunk, or with `include_usage=True, usage=...` a whole completion: OpenAI
    streams completions as this same object. A chunk carries `usage` (null unless given)
    only with `include_usage`, as chat's chunks do."""
    body: TextCompletion = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        body["usage"] = usage
    return body


# --- embeddings ---------------------------------------------------------------------------


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class Embedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32s


class EmbeddingList(TypedDict):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def embedding_list(model: str, vectors: Iterable[list[float] | str], tokens: int) -> EmbeddingList:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
