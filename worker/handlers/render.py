"""The wire shapes of chat.completion and text_completion bodies and stream chunks."""

from __future__ import annotations

import time
import uuid
from typing import Any


def usage_of(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class ChoiceRenderer:
    """The wire shapes of one endpoint: chat.completion or text_completion."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def body(
        self, texts: list[str], reasons: list[str | None], usage: dict[str, int]
    ) -> dict[str, Any]:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "logprobs": None,
                    "finish_reason": r,
                }
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    def chunk(
        self, choice: dict[str, Any] | None, usage: dict[str, int] | None, with_usage: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice is not None else [],
        }
        if with_usage:
            out["usage"] = usage
        return out

    def delta(
        self, text: str | None, reason: str | None, first: bool = False, index: int = 0
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
