"""Prompts to token ids: chat messages through the chat template, text, or given ids."""

from __future__ import annotations

from typing import Any

from worker.protocol import ChatMessage, Unsupported


class PromptError(ValueError):
    """The prompt cannot be turned into tokens; names the parameter at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def chat_prompt_ids(
    tokenizer: Any,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """With `continue_final_message`, the last (assistant) message is left open: the prompt
    ends with its text and generation carries on from there."""
    try:
        conversation = [
            # Most chat templates predate the `developer` role; it means system.
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in messages
        ]
    except Unsupported as exc:
        raise PromptError(exc.param, str(exc)) from None
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
        )
    except Exception as exc:  # jinja's raise_exception (e.g. roles must alternate)
        raise PromptError("messages", f"The chat template rejected the messages: {exc}") from exc
    # Templates write their own BOS; adding special tokens again would double it.
    return list(tokenizer.encode(text, add_special_tokens=False))


def text_prompt_ids(tokenizer: Any, prompt: str | list[int], param: str = "prompt") -> list[int]:
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
    else:
        vocab = len(tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise PromptError(param, f"Token ids must be in [0, {vocab}); got {bad[:5]}.")
        ids = list(prompt)
    if not ids:
        raise PromptError(param, "The prompt is empty.")
    return ids
