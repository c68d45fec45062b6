"""Stream resume, the pure part: what a client has been sent of a stream, whether the stream
may be continued on another backend, the continuation request, and its chunks rewritten so
that the client sees one stream."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CHAT, COMPLETIONS = "chat/completions", "completions"
RESUMABLE_TAILS = frozenset({CHAT, COMPLETIONS})
# The identity of the stream the client saw first; every chunk after a seam carries it.
IDENTITY_KEYS = ("id", "created", "system_fingerprint")
_REASONING_KEYS = ("reasoning_content", "reasoning")


@dataclass
class StreamSoFar:
    """What the client has been sent of one stream, over every part of it."""

    chat: bool
    pieces: list[str] = field(default_factory=list)
    # Content deltas: one per decode step from vLLM, SGLang and the worker, so a count of
    # the completion tokens that needs no usage chunk (a dying backend sends none).
    completion_tokens: int = 0
    identity: dict[str, Any] | None = None  # IDENTITY_KEYS as the first chunk had them
    tool_calls: bool = False
    reasoning: bool = False
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def observe(self, payload: Any) -> None:
        """Take in one chunk as the client got it."""
        if not isinstance(payload, dict):
            return
        if self.identity is None and "id" in payload:
            self.identity = {k: payload[k] for k in IDENTITY_KEYS if k in payload}
        choices = payload.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if isinstance(choice, dict):
                self._observe_choice(choice)

    def _observe_choice(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if not self.chat:
            self._add(choice.get("text"))
            return
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        if delta.get("tool_calls") or delta.get("function_call"):
            self.tool_calls = True
        if any(delta.get(key) for key in _REASONING_KEYS):
            self.reasoning = True
        self._add(delta.get("content"))

    def _add(self, text: Any) -> None:
        if isinstance(text, str) and text:
            self.pieces.append(text)
            self.completion_tokens += 1


def request_refusal(tail: str, payload: Any) -> str | None:
    """Why a request's stream could never be resumed, whatever happens to it; None if it can.
    Checked once, when the request arrives."""
    if tail not in RESUMABLE_TAILS:
        return "endpoint"
    if not isinstance(payload, dict) or payload.get("stream") is not True:
        return "not_a_stream"
    if payload.get("n") not in (1, None) or payload.get("best_of") not in (1, None):
        return "n"
    if payload.get("logprobs") or payload.get("top_logprobs"):
        return "logprobs"
    if tail == CHAT:
        messages = payload.get("messages")
        return None if isinstance(messages, list) and messages else "body"
    if payload.get("echo"):
        return "echo"  # the prompt would be sent to the client twice
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return None
    # Token ids cannot be followed by text; several prompts are several choices.
    return None if isinstance(prompt, str) else "prompt"


def stream_refusal(so_far: StreamSoFar) -> str | None:
    """Why this stream, as far as it went, cannot be continued faithfully; None if it can.

    Tool-call deltas: a half-streamed call cannot be handed back as a partial message.
    Reasoning deltas: the continuation can carry only `content`; the engine's reasoning
    parser sees only the continuation's output, so a trace cut in the middle would come back
    as content, or a finished one be dropped from the context: any reasoning refuses."""
    if so_far.tool_calls:
        return "tool_calls"
    if so_far.reasoning:
        return "reasoning"
    return None


def _reduced(limit: Any, used: int) -> Any:
    if isinstance(limit, int) and not isinstance(limit, bool):
        return limit - used
    return limit


def tokens_left(payload: dict[str, Any], so_far: StreamSoFar) -> int | None:
    """The completion budget left after what was streamed; None when the request set none."""
    limits = [
        _reduced(payload.get(key), so_far.completion_tokens)
        for key in ("max_tokens", "max_completion_tokens")
        if isinstance(payload.get(key), int)
    ]
    return min(limits) if limits else None


def continuation(tail: str, payload: dict[str, Any], so_far: StreamSoFar) -> dict[str, Any]:
    """The request that carries the stream on from exactly what the client has."""
    body = dict(payload)
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body:
            body[key] = _reduced(body[key], so_far.completion_tokens)
    text = so_far.text
    if not text:
        return body  # nothing but the role delta was sent: the original request, as it was
    if tail == COMPLETIONS:
        prompt = body["prompt"]
        body["prompt"] = prompt + text if isinstance(prompt, str) else [prompt[0] + text]
        return body
    body["messages"] = _continued_messages(payload, text)
    body["continue_final_message"] = True
    body["add_generation_prompt"] = False
    return body


def _continued_messages(payload: dict[str, Any], text: str) -> list[Any]:
    messages = list(payload["messages"])
    last = messages[-1]
    if (
        payload.get("continue_final_message") is True
        and isinstance(last, dict)
        and last.get("role") == "assistant"
    ):
        # The client was continuing a message itself: the text goes on after its own.
        content = last.get("content")
        if isinstance(content, list):
            content = [*content, {"type": "text", "text": text}]
        else:
            content = (content or "") + text
        messages[-1] = {**last, "content": content}
        return messages
    messages.append({"role": "assistant", "content": text})
    return messages


@dataclass
class Splice:
    """Rewrites the chunks of one continuation so they read as the rest of the first stream."""

    chat: bool
    identity: dict[str, Any]
    tokens_before: int  # completion tokens streamed before this continuation's seam

    def chunk(self, payload: Any) -> Any | None:
        """The chunk as the client gets it, or None when it must not reach the client (the
        continuation's own role delta: the client has one)."""
        if not isinstance(payload, dict):
            return payload
        out = {k: v for k, v in payload.items() if k not in IDENTITY_KEYS}
        out.update(self.identity)
        if isinstance(out.get("usage"), dict):
            out["usage"] = self.usage(out["usage"])
        if self.chat and isinstance(out.get("choices"), list):
            out["choices"] = [c for c in map(_without_role, out["choices"]) if c is not None]
            if not out["choices"] and not isinstance(out.get("usage"), dict):
                return None
        return out

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The continuation's usage as the whole stream's: its prompt held the text streamed
        so far, which the original prompt did not; those tokens were completion tokens."""
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return usage
        prompt = max(0, prompt - self.tokens_before)
        completion += self.tokens_before
        return {
            **usage,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _without_role(choice: Any) -> Any | None:
    """A chat choice without its `role`; None for a choice that carried nothing else."""
    if not isinstance(choice, dict) or not isinstance(choice.get("delta"), dict):
        return choice
    delta = {k: v for k, v in choice["delta"].items() if k != "role"}
    if not choice.get("finish_reason") and not any(v not in (None, "") for v in delta.values()):
        return None
    return {**choice, "delta": delta}


@dataclass
class StreamWatch:
    """One resumable stream over all its parts: what the client has, and the seams so far."""

    tail: str
    max_resumes: int
    so_far: StreamSoFar
    seams: int = 0
    died: set[str] = field(default_factory=set)  # backends (target keys) that cut it
    splice: Splice | None = None  # the current part's rewriting; None for the first part
    done: bool = False  # `[DONE]` was relayed

    @classmethod
    def of(cls, tail: str, max_resumes: int) -> StreamWatch:
        return cls(tail, max_resumes, StreamSoFar(chat=tail == CHAT))

    def refusal(
        self, backend_resumes: bool, time_left: float | None, payload: dict[str, Any]
    ) -> str | None:
        """Why the stream, cut now, is not continued; None if it may be."""
        if not backend_resumes:
            return "not_enabled"
        if self.seams >= self.max_resumes:
            return "max_resumes"
        if time_left is not None and time_left <= 0:
            return "timeout"
        left = tokens_left(payload, self.so_far)
        if self.so_far.finish_reason is not None or (left is not None and left < 1):
            return "finished"  # cut between its end and [DONE]: nothing left to generate
        return stream_refusal(self.so_far)

    def next_part(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The continuation's request body; chunks from now on are spliced in."""
        self.seams += 1
        identity = self.so_far.identity or {}
        self.splice = Splice(self.so_far.chat, identity, self.so_far.completion_tokens)
        return continuation(self.tail, payload, self.so_far)


def continued_body(body: dict[str, Any], upstream_model: str, ask_usage: bool) -> bytes:
    """The continuation as one backend gets it: its model name, and usage asked for when the
    gateway asks (as `RequestBody.for_hop` does for the client's own request)."""
    out = {**body, "model": upstream_model}
    if ask_usage:
        out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def exact_payload(raw: bytes) -> dict[str, Any]:
    """The client's JSON body parsed for re-encoding (every integer exact)."""
    payload = json.loads(raw)
    assert isinstance(payload, dict)  # the handler accepted it as an object
    return payload
