"""vLLM-shaped /v1/tokenize and /v1/detokenize."""

from __future__ import annotations

import aiohttp

from tests.worker.conftest import WorkerProcess

TEXT = "Grüße, 世界! 🎉 naïve café — ok"


async def test_tokenize_detokenize_round_trip(worker: WorkerProcess) -> None:
    async with aiohttp.ClientSession(headers=worker.headers) as http:
        async with http.post(
            f"{worker.base_url}/tokenize",
            json={"model": "demo", "prompt": TEXT, "return_token_strs": True},
        ) as r:
            assert r.status == 200
            tok = await r.json()
        assert tok["count"] == len(tok["tokens"]) > 0
        assert tok["max_model_len"] == 512
        assert len(tok["token_strs"]) == tok["count"]
        async with http.post(
            f"{worker.base_url}/detokenize", json={"model": "demo", "tokens": tok["tokens"]}
        ) as r:
            assert r.status == 200
            assert (await r.json())["prompt"] == TEXT
        # vLLM also serves them without the /v1 prefix.
        async with http.post(f"{worker.origin}/tokenize", json={"prompt": TEXT}) as r:
            assert (await r.json())["tokens"] == tok["tokens"]


async def test_detokenize_rejects_unknown_token_ids(worker: WorkerProcess) -> None:
    async with (
        aiohttp.ClientSession(headers=worker.headers) as http,
        http.post(
            f"{worker.base_url}/detokenize", json={"model": "demo", "tokens": [1, 10**9]}
        ) as r,
    ):
        assert r.status == 400
        body = await r.json()
    assert body["error"]["param"] == "tokens"
