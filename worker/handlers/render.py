"""One answer's bodies and stream chunks, chat.completion or text_completion, in the shapes
wire.protocol defines."""

from __future__ import annotations

import time
import uuid
from typing import Any

from wire import protocol
from wire.protocol import (
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    TextChoice,
    TextCompletion,
    Usage,
)


class _Renderer:
    """What every body and chunk of one answer shares: its id, creation time and model."""

    PREFIX = ""

    def __init__(self, model: str) -> None:
        self.id = self.PREFIX + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def opening(self, index: int) -> Any | None:
        """The chunk choice that opens choice `index` of a stream, if the shape has one."""
        return None


class ChatRenderer(_Renderer):
    PREFIX = "chatcmpl-"

    def body(self, texts: list[str], reasons: list[str | None], usage: Usage) -> ChatCompletion:
        choices = [
            protocol.chat_choice(i, text, reason)
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ]
        return protocol.chat_completion(self.id, self.created, self.model, choices, usage)

    def chunk(
        self, choice: ChatChunkChoice | None, usage: Usage | None, with_usage: bool
    ) -> ChatCompletionChunk:
        """A chunk of one choice or, with `usage`, the choiceless last one."""
        choices = [choice] if choice is not None else []
        return protocol.chat_chunk(
            self.id, self.created, self.model, choices, include_usage=with_usage, usage=usage
        )

    def opening(self, index: int) -> ChatChunkChoice:
        """The role, no text yet: what opens each choice of an OpenAI chat stream."""
        return protocol.chat_chunk_choice(index, protocol.first_chat_delta(), None)

    def delta(self, text: str, index: int) -> ChatChunkChoice:
        return protocol.chat_chunk_choice(index, {"content": text}, None)

    def finish(self, reason: str, index: int) -> ChatChunkChoice:
        return protocol.chat_chunk_choice(index, {}, reason)


class TextRenderer(_Renderer):
    PREFIX = "cmpl-"

    def body(self, texts: list[str], reasons: list[str | None], usage: Usage) -> TextCompletion:
        choices = [
            protocol.text_choice(i, text, reason)
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ]
        return protocol.text_completion(
            self.id, self.created, self.model, choices, include_usage=True, usage=usage
        )

    def chunk(
        self, choice: TextChoice | None, usage: Usage | None, with_usage: bool
    ) -> TextCompletion:
        """A chunk of one choice or, with `usage`, the choiceless last one: OpenAI streams
        completions as the completion object itself."""
        choices = [choice] if choice is not None else []
        return protocol.text_completion(
            self.id, self.created, self.model, choices, include_usage=with_usage, usage=usage
        )

    def delta(self, text: str, index: int) -> TextChoice:
        return protocol.text_choice(index, text, None)

    def finish(self, reason: str, index: int) -> TextChoice:
        return protocol.text_choice(index, "", reason)


ChoiceRenderer = ChatRenderer | TextRenderer
