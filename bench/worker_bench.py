"""Worker benchmark: concurrent streaming clients, batched worker vs --max-batch-size 1."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from common import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/worker_bench.py` from anywhere can import worker


@dataclass
class Result:
    concurrency: int
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def ttft(self, q: float) -> float:
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(
    http: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int
) -> tuple[int, float]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # every request decodes exactly max_tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft = None
    tokens = 0
    async with http.post(f"{url}/completions", json=body) as resp:
        resp.raise_for_status()
        buffer = b""
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                payload = json.loads(data)
                if ttft is None and payload["choices"] and payload["choices"][0]["text"]:
                    ttft = time.perf_counter() - started
                if payload.get("usage"):
                    tokens = payload["usage"]["completion_tokens"]
    return tokens, ttft if ttft is not None else time.perf_counter() - started


async def run_level(
    url: str, model: str, concurrency: int, requests_each: int, max_tokens: int
) -> Result:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as http:
        await _one(http, url, model, "warm up", 4)

        async def client(i: int) -> list[tuple[int, float]]:
            return [
                await _one(http, url, model, f"Client {i} request {r}: def f(x):", max_tokens)
                for r in range(requests_each)
            ]

        started = time.perf_counter()
        results = await asyncio.gather(*(client(i) for i in range(concurrency)))
        seconds = time.perf_counter() - started
    flat = [x for per_client in results for x in per_client]
    return Result(concurrency, sum(t for t, _ in flat), seconds, [f for _, f in flat])


class Worker:
    """A `python -m worker` subprocess, started and stopped around one measurement."""

    def __init__(self, model: str, extra: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {**os.environ, "LOG_FORMAT": "json", "PYTHONPATH": str(REPO)}
        env.pop("WORKER_API_KEY", None)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--served-model-name", "bench", *extra],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"worker exited; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    health = json.load(r)
                    if health.get("status") == "ok":
                        return health
            except OSError:
                pass
            time.sleep(0.25)
        raise SystemExit(f"worker not ready after {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def measure(
    model: str, extra: list[str], levels: list[int], args: argparse.Namespace, log: Path
) -> tuple[dict, list[Result]]:
    worker = Worker(model, extra, log)
    try:
        health = worker.wait_ready()
        results = [
            asyncio.run(
                run_level(worker.url, "bench", c, args.requests_per_client, args.max_tokens)
            )
            for c in levels
        ]
    finally:
        worker.stop()
    return health, results


def build_random_llama(path: Path, size: str) -> None:
    """A random-init Llama of about 1B parameters (Llama-3.2-1B's shape), for GPU runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from worker.demo import ensure_demo_model

    if (path / "config.json").exists():
        return
    demo = ensure_demo_model(Path(tempfile.gettempdir()) / "bench-demo-model")
    tokenizer = AutoTokenizer.from_pretrained(demo)
    shapes = {
        "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "num_attention_heads": 32, "num_key_value_heads": 8},
    }  # fmt: skip
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **shapes[size],
    )  # fmt: skip
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def bandwidth_bound(health: dict, model_path: str, hbm_gb_s: float, results: list[Result]) -> None:
    """Decode reads every weight once per step: steps/s <= bandwidth / weight bytes."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = st.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * 2  # bfloat16
    steps_bound = hbm_gb_s * 1e9 / total
    print(f"\nweights {total / 1e9:.2f} GB: <= {steps_bound:.0f} decode steps/s at {hbm_gb_s} GB/s")
    for r in results:
        steps = r.tokens_per_s / r.concurrency
        share = steps / steps_bound
        print(f"  {r.concurrency:3d} clients: {steps:7.1f} steps/s = {share:.0%} of the bound")


def compare_engines(model: str, levels: list[int], max_tokens: int, threads: int) -> None:
    """In-process, no HTTP: our engine (the manager + RequestSampler) against
    `model.generate` on a left-padded static batch, the best case of a simple own loop."""
    import torch

    from worker import models
    from worker.engine import Engine
    from worker.sampling import SamplingParams
    from worker.settings import Settings

    loaded = models.load(Settings(model=model, torch_threads=threads))
    tok, lm = loaded.tokenizer, loaded.model
    prompts = [f"Client {i} request: def f(x):" for i in range(max(levels))]
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    def static(k: int) -> tuple[float, list[list[int]]]:
        enc = tok(prompts[:k], return_tensors="pt", padding=True).to(lm.device)
        started = time.perf_counter()
        with torch.no_grad():
            out = lm.generate(
                **enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        rate = k * max_tokens / (time.perf_counter() - started)
        return rate, out[:, enc.input_ids.shape[1] :].tolist()

    static_rates = {}
    for k in levels:
        static(k)  # warm-up
        static_rates[k], reference = static(k)

    async def ours() -> tuple[dict[int, float], list[list[int]]]:
        engine = Engine(loaded, max(levels), 1024)
        await asyncio.to_thread(engine.start)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        async def one(i: int) -> list[int]:
            gen = engine.generate(tok.encode(prompts[i]), params)
            tokens: list[int] = []
            try:
                async for step in gen:
                    tokens += step.token_ids
            finally:
                await gen.aclose()
            return tokens

        rates = {}
        try:
            await one(0)
            for k in levels:
                started = time.perf_counter()
                outs = await asyncio.gather(*(one(i) for i in range(k)))
                rates[k] = k * max_tokens / (time.perf_counter() - started)
        finally:
            await asyncio.to_thread(engine.stop)
        return rates, outs

    our_rates, our_tokens = asyncio.run(ours())
    print(f"\n{'requests':>8} | {'our engine tok/s':>16} | {'static generate tok/s':>21} | share")
    for k in levels:
        share = our_rates[k] / static_rates[k]
        print(f"{k:>8} | {our_rates[k]:>16.0f} | {static_rates[k]:>21.0f} | {share:.0%}")
    same = sum(a == b for a, b in zip(our_tokens, reference, strict=True))
    print(f"greedy tokens identical to the static batch: {same}/{len(reference)} sequences")


def _cells(r: Result) -> str:
    p50, p95 = r.ttft(0.5) * 1000, r.ttft(0.95) * 1000
    return f"{r.tokens_per_s:>13.1f} {p50:>7.0f}ms {p95:>7.0f}ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="demo", help="model folder or 'demo'")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the --max-batch-size 1 run")
    p.add_argument(
        "--random-llama-1b", metavar="PATH", help="build (once) and bench a random ~1B Llama"
    )
    p.add_argument(
        "--compare-engines",
        action="store_true",
        help="in-process: our engine vs a static padded generate() batch, then exit",
    )
    p.add_argument(
        "--hbm-gb-s", type=float, default=None, help="GPU memory bandwidth, for the bound"
    )
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    model = args.model
    if args.random_llama_1b:
        build_random_llama(Path(args.random_llama_1b), "1b")
        model = args.random_llama_1b
    if args.compare_engines:
        path = model
        if model == "demo":
            from worker.demo import ensure_demo_model

            path = str(ensure_demo_model())
        compare_engines(path, levels, args.max_tokens, args.torch_threads or 1)
        return
    common = ["--max-queue", "1024"]
    if args.torch_threads:
        common += ["--torch-threads", str(args.torch_threads)]
    logs = Path(tempfile.mkdtemp(prefix="worker-bench-"))

    health, batched = measure(
        model,
        [*common, "--max-batch-size", str(args.max_batch_size)],
        levels,
        args,
        logs / "batched.log",
    )
    print(f"worker: model={health['model']} device={health['device']} dtype={health['dtype']} "
          f"max_batch_size={args.max_batch_size}; {args.requests_per_client} requests per client, "
          f"{args.max_tokens} tokens each, streaming")  # fmt: skip
    serial: list[Result] = []
    if not args.no_baseline:
        _, serial = measure(
            model, [*common, "--max-batch-size", "1"], levels, args, logs / "serial.log"
        )

    header = f"{'clients':>7} | {'batched tok/s':>13} {'TTFT p50':>9} {'TTFT p95':>9}"
    if serial:
        header += f" | {'batch-1 tok/s':>13} {'TTFT p50':>9} {'TTFT p95':>9} | {'ratio':>6}"
    print("\n" + header)
    for i, b in enumerate(batched):
        row = f"{b.concurrency:>7} | {_cells(b)}"
        if serial:
            ratio = b.tokens_per_s / serial[i].tokens_per_s
            row += f" | {_cells(serial[i])} | {ratio:>5.2f}x"
        print(row)
    if serial:
        top, base = batched[-1], serial[-1]
        print(
            f"\n{top.concurrency} clients, batched vs --max-batch-size 1: "
            f"{top.tokens_per_s / base.tokens_per_s:.2f}x aggregate tokens/s "
            f"({top.tokens_per_s / batched[0].tokens_per_s:.2f}x one client alone)"
        )
    if args.hbm_gb_s:
        bandwidth_bound(health, model, args.hbm_gb_s, batched)
    print(f"(worker logs: {logs})")


if __name__ == "__main__":
    main()
