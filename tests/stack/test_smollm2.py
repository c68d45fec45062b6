"""The real built-in model end to end: the worker converts SmolLM2 135M Instruct on its first
start, loads the cache on the next, and answers a factual question through the real gateway
and the openai SDK. About a minute: -m "not real_model" skips it. (Damaged caches being
rebuilt: tests/worker/test_smollm2_cache.py, on the same code path with a quick converter.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.stack.processes import ROOT, environment, free_port, stop, wait_healthy
from worker import smollm2

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WORKER = [sys.executable, "-m", "worker", "--model", "smollm2", "--host", "127.0.0.1"]
GATEWAY = [sys.executable, "-m", "gateway", "--host", "127.0.0.1"]
# Small enough to leave memory for the rest of the suite running beside it.
WORKER_LIMITS = ["--max-batch-size", "4", "--kv-cache-tokens", "2048", "--max-model-len", "1024"]


def start_worker(tmp: Path, cache_root: Path, log_name: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    log_path = tmp / log_name
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*WORKER, "--port", str(port), *WORKER_LIMITS],
            cwd=ROOT,
            env=environment(tmp, WORKER_CACHE_DIR=str(cache_root)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, port, log_path


def events(log_path: Path) -> list[str]:
    names = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            names.append(json.loads(line)["event"])
        except (ValueError, KeyError, TypeError):
            continue
    return names


def start_and_stop(tmp: Path, cache_root: Path, log_name: str) -> list[str]:
    process, port, log_path = start_worker(tmp, cache_root, log_name)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process, seconds=600)
    finally:
        stop(process)
    return events(log_path)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2") / "cache"


@pytest.fixture(scope="module")
def first_start(tmp_path_factory, cache_root) -> list[str]:
    return start_and_stop(tmp_path_factory.mktemp("first"), cache_root, "worker.log")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, cache_root, first_start) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("stack")
    worker, worker_port, worker_log = start_worker(tmp, cache_root, "worker.log")
    config = tmp / "gateway.json"
    # The shipped example, pointed at this test's worker.
    example = json.loads((ROOT / "config.example.json").read_text())
    endpoint = example["endpoints"]["smollm2"]
    endpoint["url"] = f"http://127.0.0.1:{worker_port}/v1"
    config.write_text(json.dumps(example))
    gateway_port = free_port()
    with (tmp / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(
            [*GATEWAY, "--config", str(config), "--port", str(gateway_port)],
            cwd=ROOT,
            env=environment(tmp),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{worker_port}/health", worker, seconds=600)
        wait_healthy(f"http://127.0.0.1:{gateway_port}/health", gateway)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="x", max_retries=0
        )
        yield {"client": client, "worker_port": worker_port, "worker_log": worker_log}
        client.close()
    finally:
        stop(gateway)
        stop(worker)


def ask(client: openai.OpenAI, **extra) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=24, temperature=0, **extra
    )


def test_the_first_start_converts_the_gguf(first_start) -> None:
    assert "builtin_model_converting" in first_start
    assert "builtin_model_converted" in first_start
    assert "builtin_model_cache_used" not in first_start
    assert "worker_ready" in first_start


def test_the_next_start_loads_the_cache(stack) -> None:
    started = events(stack["worker_log"])
    assert "builtin_model_cache_used" in started
    assert "builtin_model_converting" not in started


def test_a_factual_question_through_the_gateway(stack) -> None:
    models = stack["client"].models.list().data
    assert [(m.id, m.model_extra["name"]) for m in models] == [("smollm2", smollm2.DISPLAY_NAME)]
    answer = ask(stack["client"])
    assert answer.model == "smollm2"
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"  # the model's own <|im_end|>


def test_the_readme_curl_line_answers_in_a_sentence(stack) -> None:
    readme = (ROOT / "README.md").read_text()
    body = re.search(r"^curl -s \S+/v1/chat/completions .*\n  -d '(.+)'$", readme, re.M)
    assert body, "the README's chat curl line"
    request = json.loads(body.group(1))
    assert request["model"] == "smollm2"
    answer = stack["client"].chat.completions.create(**request)
    assert answer.choices[0].message.content == "The capital of France is Paris."


def test_requests_without_sampling_get_the_model_card_settings(stack) -> None:
    haiku = [{"role": "user", "content": "Write a haiku about the sea."}]

    def reply(**sampling) -> str:
        answer = stack["client"].chat.completions.create(
            model="smollm2", messages=haiku, max_tokens=40, seed=7, **sampling
        )
        return answer.choices[0].message.content

    recommended = reply(
        temperature=smollm2.RECOMMENDED_TEMPERATURE, top_p=smollm2.RECOMMENDED_TOP_P
    )
    assert reply() == recommended
    assert reply(temperature=1.0, top_p=1.0) != recommended


def test_streaming_gives_the_same_answer(stack) -> None:
    chunks = list(ask(stack["client"], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(stack["client"]).choices[0].message.content


def test_a_stop_string_ends_the_answer_before_it(stack) -> None:
    answer = ask(stack["client"], stop=["Paris"])
    assert "Paris" not in answer.choices[0].message.content
    assert answer.choices[0].message.content.startswith("The capital of France is")
    assert answer.choices[0].finish_reason == "stop"


def test_text_completion(stack) -> None:
    completion = stack["client"].completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in completion.choices[0].text


def test_concurrent_requests_are_batched_to_the_same_answers(stack) -> None:
    questions = ["What is the capital of France?", "What is 2 + 2?", "Name a colour.", "Hi!"]

    def one(question: str) -> str:
        reply = stack["client"].chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
        )
        return reply.choices[0].message.content

    alone = [one(q) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(one, questions))
    assert together == alone
    assert "Paris" in together[0]


def post_to_worker(stack: dict, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack['worker_port']}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_tokenize_uses_the_model_chat_template(stack) -> None:
    tokens = post_to_worker(
        stack, "/tokenize", {"model": "smollm2", "messages": QUESTION, "return_token_strs": True}
    )
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["token_strs"][0] == "<|im_start|>"
    prompt = post_to_worker(stack, "/detokenize", {"model": "smollm2", "tokens": tokens["tokens"]})
    # SmolLM2's own template: ChatML with its default system prompt.
    text = prompt["prompt"]
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
