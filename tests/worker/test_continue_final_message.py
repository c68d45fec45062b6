"""A partial assistant message is continued, as vLLM does with `continue_final_message`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.worker.conftest import WorkerProcess

PARTIAL = "def main(self, "
CONVERSATION = [
    {"role": "user", "content": "Write some code"},
    {"role": "assistant", "content": PARTIAL},
]
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}
OPEN_TEXT = f"<|im_start|>user\nWrite some code<|im_end|>\n<|im_start|>assistant\n{PARTIAL}"


def test_the_prompt_ends_inside_the_final_message(demo_cache: Path) -> None:
    from transformers import AutoTokenizer

    from worker.prompts import chat_prompt_ids
    from worker.protocol import ChatMessage

    tokenizer = AutoTokenizer.from_pretrained(demo_cache)
    messages = [ChatMessage.model_validate(m) for m in CONVERSATION]
    ids = chat_prompt_ids(tokenizer, messages, False, continue_final_message=True)
    # Not closed with <|im_end|>, the trailing space kept, no new assistant turn opened.
    assert tokenizer.decode(ids) == OPEN_TEXT
    closed = chat_prompt_ids(tokenizer, messages, False)
    assert tokenizer.decode(closed) == OPEN_TEXT + "<|im_end|>\n"


async def test_a_continued_message_is_generated_from_its_text(
    client: openai.AsyncOpenAI, demo_tokenizer: Any
) -> None:
    common: dict[str, Any] = {"model": "demo", "max_tokens": 8, "temperature": 0}
    continued = await client.chat.completions.create(
        messages=CONVERSATION,  # type: ignore[arg-type]
        extra_body={**CONTINUE, "ignore_eos": True},
        **common,
    )
    prompt_ids = demo_tokenizer.encode(OPEN_TEXT, add_special_tokens=False)
    assert continued.usage is not None and continued.usage.prompt_tokens == len(prompt_ids)
    # The same prompt as raw tokens gives the same greedy text: the continuation is exactly
    # "the model carrying on after the partial text".
    plain = await client.completions.create(
        prompt=prompt_ids, extra_body={"ignore_eos": True}, **common
    )
    assert continued.choices[0].message.content == plain.choices[0].text


async def test_a_continued_stream_has_one_role_delta_and_ends_with_done(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.chat.completions.create(
        model="demo",
        messages=CONVERSATION,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        stream=True,
        extra_body={**CONTINUE, "ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # vLLM refuses the same combination.
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        ({"continue_final_message": True}, "continue_final_message"),  # the default is true
        (
            {
                "continue_final_message": True,
                "add_generation_prompt": False,
                "messages": [{"role": "user", "content": "hi"}],
            },
            "continue_final_message",
        ),
    ],
)
async def test_contradictory_continuations_are_400(
    worker: WorkerProcess, body: dict[str, Any], param: str
) -> None:
    request = {"model": "demo", "messages": CONVERSATION, "max_tokens": 2, **body}
    async with (
        aiohttp.ClientSession(headers=worker.headers) as http,
        http.post(f"{worker.base_url}/chat/completions", json=request) as r,
    ):
        status, payload = r.status, await r.json()
    assert status == 400, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param
