"""/v1/embeddings: the served model's pooled states, and a real sentence model (MiniLM)."""

from __future__ import annotations

import base64
import math
import struct
from pathlib import Path

import openai
import pytest


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_served_model_embeddings(client: openai.AsyncOpenAI) -> None:
    resp = await client.embeddings.create(model="demo", input=["hello world", "goodbye"])
    assert [d.index for d in resp.data] == [0, 1]
    vectors = [d.embedding for d in resp.data]
    assert all(len(v) == 256 for v in vectors)  # the demo model's hidden size
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    alone = await client.embeddings.create(model="demo", input="hello world")
    # Padding inside a batch must not change a vector.
    assert _cos(alone.data[0].embedding, vectors[0]) > 0.9999
    assert resp.usage.prompt_tokens > 2


async def test_base64_encoding_matches_floats(client: openai.AsyncOpenAI) -> None:
    floats = await client.embeddings.create(model="demo", input="abc", encoding_format="float")
    raw = await client.embeddings.with_raw_response.create(
        model="demo", input="abc", encoding_format="base64"
    )
    packed = raw.http_response.json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(base64.b64decode(packed)) // 4}f", base64.b64decode(packed))
    assert decoded == pytest.approx(floats.data[0].embedding, abs=1e-6)


async def test_minilm_embeddings_match_sentence_transformers(
    client: openai.AsyncOpenAI, minilm_path: Path
) -> None:
    sentences = [
        "A cat sits on the mat.",
        "A kitten is resting on a rug.",
        "The stock market fell sharply today.",
    ]
    resp = await client.embeddings.create(model="all-MiniLM-L6-v2", input=sentences)
    vectors = [d.embedding for d in resp.data]
    assert all(len(v) == 384 for v in vectors)
    # Meaning, not noise: the two cat sentences are closer than cat and stocks.
    assert _cos(vectors[0], vectors[1]) > _cos(vectors[0], vectors[2]) + 0.3

    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(sentences)
    for ours, theirs in zip(vectors, reference, strict=True):
        assert _cos(ours, theirs.tolist()) > 0.999


async def test_models_lists_the_embedding_model(client: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert ids == ["demo", "all-MiniLM-L6-v2"]


async def test_embedding_input_over_the_limit_is_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model="all-MiniLM-L6-v2", input="word " * 600)
    assert "512" in err.value.message
