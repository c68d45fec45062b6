"""The built-in demo model: a tiny random-weight Llama and a tokenizer trained on local text."""

from __future__ import annotations

import shutil
import sysconfig
import tempfile
from pathlib import Path

import structlog

from worker import cache

log = structlog.get_logger(__name__)

DEMO_NAME = "demo"
DEMO_OWNER = "demo-random-weights"
# Bump when the recipe changes so an old cache is rebuilt rather than silently reused.
DEMO_VERSION = "1"
_MARKER = "demo-model-version"

BOS, EOS, IM_START, IM_END = "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 4096
_TRAINING_TEXT_BYTES = 3_000_000


def demo_model_dir(cache_root: str | None = None) -> Path:
    """`<cache root>/demo-model`; the root is `WORKER_CACHE_DIR`, else ~/.cache/llm-gateway."""
    return cache.cache_root(cache_root) / "demo-model"


def is_built(path: Path) -> bool:
    marker = path / _MARKER
    return marker.is_file() and marker.read_text().strip() == DEMO_VERSION


def ensure_demo_model(path: Path | None = None) -> Path:
    """Build the demo model into `path` unless a build of this version is already there."""
    path = (path or demo_model_dir()).expanduser()
    if is_built(path):
        return path
    if path.exists() and any(path.iterdir()) and not (path / _MARKER).exists():
        # Never delete a folder we did not build.
        raise RuntimeError(f"{path} exists and is not a demo model build; move it away")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place, so two workers starting at once never
    # see (or load) a half-written folder; the loser of the race just discards its copy.
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=path.parent))
    try:
        _build(staging)
        if path.exists() and not is_built(path):
            shutil.rmtree(path, ignore_errors=True)  # empty, or an older demo version
        try:
            staging.rename(path)
        except OSError:
            if not is_built(path):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("demo_model_built", path=str(path), note="random weights: output is gibberish")
    return path


def _training_text() -> list[str]:
    """Text that every machine with Python has: the standard library's own sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for file in sorted(stdlib.glob("*.py")):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= _TRAINING_TEXT_BYTES:
            break
    # A few non-ASCII lines so common multi-byte characters get merged tokens of their own.
    texts.append("café naïve résumé — “quotes” … 你好, 世界。こんにちは 🙂 ñandú Ørsted\n" * 50)
    return texts


def _build(path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, BOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(path)

    eos_ids = [fast.convert_tokens_to_ids(EOS), fast.convert_tokens_to_ids(IM_END)]
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=fast.bos_token_id, eos_token_id=eos_ids, pad_token_id=fast.pad_token_id
    )
    model.save_pretrained(path)
    (path / _MARKER).write_text(DEMO_VERSION + "\n")
