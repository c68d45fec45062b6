"""Loading the served model and tokenizer: device, dtype, built-in models, chat template."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

from worker import demo, smollm2
from worker.sampling import SamplingDefaults
from worker.settings import Settings

log = structlog.get_logger(__name__)

# Used when a tokenizer ships no chat template: plain role-prefixed turns, which any
# base model can at least continue, instead of refusing chat requests.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    served_name: str
    owned_by: str
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: list[int]
    created: int  # load time, for /v1/models
    # For requests that leave temperature/top_p/top_k out: the model's own recommendation.
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bfloat16 halves the bytes read per decode step on GPU; CPU matmuls are fastest
        # (and exact) in float32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return dtype


def default_torch_threads() -> int:
    # One core stays free for the event loop, the tokenizer and whatever runs beside us:
    # oversubscribed torch threads slowed generation 4-6x on a 2-core machine.
    return max(1, (os.cpu_count() or 2) - 1)


def ensure_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        log.info("chat_template_fallback", reason="tokenizer has no chat template")


def model_source(settings: Settings) -> tuple[str, str, str]:
    """(folder to load, default served name, owned_by) for a built-in name or a path."""
    if settings.model == demo.DEMO_NAME:
        path = str(demo.ensure_demo_model(demo.demo_model_dir(settings.cache_dir)))
        log.warning("demo_model", path=path, note="random weights: output is gibberish")
        return path, demo.DEMO_NAME, demo.DEMO_OWNER
    if settings.model == smollm2.NAME:
        path = str(smollm2.ensure_converted(smollm2.cache_dir(settings.cache_dir)))
        return path, smollm2.NAME, smollm2.OWNER
    name = Path(settings.model.rstrip("/")).name or settings.model
    return settings.model, name, "llm-gateway-worker"


def load(settings: Settings) -> LoadedModel:
    """Load the model named by `settings` (building or converting a built-in one first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    torch.set_num_threads(settings.torch_threads or default_torch_threads())
    path, default_name, owner = model_source(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)

    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer or path)
    ensure_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()

    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or 2048
    max_model_len = min(settings.max_model_len or limit, limit)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    served = settings.served_model_name or default_name
    sampling_defaults = SamplingDefaults.from_generation_config(model.generation_config)
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "model_loaded",
        model=served,
        path=path,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        parameters=params,
        max_model_len=max_model_len,
        torch_threads=torch.get_num_threads(),
        seconds=round(time.monotonic() - started, 1),
        sampling_defaults=dataclasses.asdict(sampling_defaults),
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        served_name=served,
        owned_by=owner,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        eos_token_ids=eos_ids,
        created=int(time.time()),
        sampling_defaults=sampling_defaults,
    )
