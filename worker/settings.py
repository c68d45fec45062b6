"""Worker settings: command-line flags, each with an environment equivalent."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    model: str = "demo"
    served_model_name: str | None = None  # default: the built-in's name, or the folder's name
    tokenizer: str | None = None  # default: the model folder
    host: str = "0.0.0.0"
    port: int = 8000
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    max_batch_size: int = 32
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_queue: int = 256
    api_key: str | None = None  # only from WORKER_API_KEY: a flag would show in `ps`
    embedding_model: str | None = None
    embedding_model_name: str | None = None  # default: the embedding folder's name
    kv_cache_tokens: int | None = None  # default: sized from free GPU memory, or a CPU default
    torch_threads: int | None = None  # default: one per core, less one left for the server
    cache_dir: str | None = None  # cache root for built-in models; WORKER_CACHE_DIR
    max_body_bytes: int = 32 * 1024 * 1024
    # Reuse the KV blocks of earlier prompts' prefixes (transformers' block sharing).
    prefix_caching: bool = False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker",
        description="OpenAI-compatible model worker with continuous batching.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""other environment variables:
  WORKER_API_KEY    when set, /v1 requests need 'Authorization: Bearer <key>'
  WORKER_CACHE_DIR  where built-in models are built (default ~/.cache/llm-gateway)
  LOG_FORMAT        json or console (default: json unless stderr is a terminal)
  LOG_LEVEL         default INFO
  OTEL_EXPORTER_OTLP_ENDPOINT  when set (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), traces
                    go there over OTLP/HTTP; OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME
                    and the other OTEL_* variables as the OpenTelemetry SDK reads them""",
    )
    p.add_argument(
        "--model",
        help="local model folder, a hub id, or a built-in: 'smollm2' (SmolLM2 135M Instruct) "
        "or 'demo' (random weights) (env MODEL_PATH, default demo)",
    )
    p.add_argument("--served-model-name", help="model id clients send (env MODEL_NAME)")
    p.add_argument(
        "--tokenizer", help="tokenizer folder; default: the model's (env TOKENIZER_PATH)"
    )
    p.add_argument("--host", help="bind address (env WORKER_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (env WORKER_PORT, default 8000)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (env DEVICE)")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16 (env DTYPE)")
    p.add_argument(
        "--max-batch-size", type=int, help="sequences decoded together (env MAX_BATCH_SIZE)"
    )
    p.add_argument("--max-model-len", type=int, help="context length in tokens (env MAX_MODEL_LEN)")
    p.add_argument("--max-queue", type=int, help="requests waiting for a slot (env MAX_QUEUE)")
    p.add_argument(
        "--embedding-model", help="sentence-embedding model folder (env EMBEDDING_MODEL)"
    )
    p.add_argument("--embedding-model-name", help="its model id (env EMBEDDING_MODEL_NAME)")
    p.add_argument("--kv-cache-tokens", type=int, help="KV cache capacity (env KV_CACHE_TOKENS)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (env TORCH_THREADS)")
    p.add_argument(
        "--prefix-caching",
        action="store_true",
        default=None,
        help="reuse the KV cache of earlier prompts' prefixes (env PREFIX_CACHING=1)",
    )
    return p


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over environment variables, which win over the defaults."""
    env = os.environ if env is None else env
    args = _parser().parse_args(argv)
    d = Settings()

    def pick(flag: object, name: str) -> str | None:
        if flag is not None:
            return str(flag)
        return env.get(name) or None

    def number(flag: int | None, name: str) -> int | None:
        value = pick(flag, name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise SystemExit(f"{name} must be an integer, got {value!r}") from None

    return Settings(
        model=pick(args.model, "MODEL_PATH") or d.model,
        served_model_name=pick(args.served_model_name, "MODEL_NAME"),
        tokenizer=pick(args.tokenizer, "TOKENIZER_PATH"),
        # Prefixed: zsh sets HOST to the machine's name, and platforms set PORT for others.
        host=pick(args.host, "WORKER_HOST") or d.host,
        port=number(args.port, "WORKER_PORT") or d.port,
        device=pick(args.device, "DEVICE") or d.device,
        dtype=pick(args.dtype, "DTYPE") or d.dtype,
        max_batch_size=number(args.max_batch_size, "MAX_BATCH_SIZE") or d.max_batch_size,
        max_model_len=number(args.max_model_len, "MAX_MODEL_LEN"),
        max_queue=_or(number(args.max_queue, "MAX_QUEUE"), d.max_queue),
        api_key=env.get("WORKER_API_KEY") or None,
        embedding_model=pick(args.embedding_model, "EMBEDDING_MODEL"),
        embedding_model_name=pick(args.embedding_model_name, "EMBEDDING_MODEL_NAME"),
        kv_cache_tokens=number(args.kv_cache_tokens, "KV_CACHE_TOKENS"),
        torch_threads=number(args.torch_threads, "TORCH_THREADS"),
        cache_dir=env.get("WORKER_CACHE_DIR") or None,
        prefix_caching=bool(args.prefix_caching)
        or env.get("PREFIX_CACHING", "").strip().lower() in ("1", "true", "yes", "on"),
    )


def _or(value: int | None, default: int) -> int:
    # Unlike `or`, keeps an explicit 0 (MAX_QUEUE=0: no waiting at all).
    return default if value is None else value
