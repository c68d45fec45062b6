"""Pieces tested alone: incremental detokenizer, stop filter, settings, demo model cache."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from worker.demo import ensure_demo_model, is_built
from worker.detokenize import IncrementalDetokenizer, StopFilter
from worker.settings import parse_settings


def test_detokenizer_deltas_add_up_to_the_whole_decode(demo_tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    vocab = len(demo_tokenizer)
    for _ in range(50):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        detok = IncrementalDetokenizer(demo_tokenizer)
        parts = []
        i = 0
        while i < len(ids):
            n = rng.randrange(1, 4)  # tokens arrive one or a few at a time
            parts.append(detok.push(ids[i : i + n]))
            i += n
        parts.append(detok.flush())
        assert "".join(parts) == demo_tokenizer.decode(ids, skip_special_tokens=True)


def test_detokenizer_holds_back_half_characters(demo_tokenizer) -> None:  # type: ignore[no-untyped-def]
    # An emoji the demo tokenizer has never merged: it arrives as 4 byte-level tokens.
    ids = demo_tokenizer.encode("🦒")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(demo_tokenizer)
    deltas = [detok.push([t]) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🦒"


def test_tokenizer_without_chat_template_gets_the_fallback(demo_cache: Path) -> None:
    from transformers import AutoTokenizer

    from worker.models import ensure_chat_template
    from worker.prompts import chat_prompt_ids
    from worker.protocol import ChatMessage

    tokenizer = AutoTokenizer.from_pretrained(demo_cache)
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    messages = [
        ChatMessage(role="developer", content="Be terse."),
        ChatMessage(
            role="user",
            content=[{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
        ),
    ]
    ids = chat_prompt_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == "System: Be terse.\n\nUser: Hi there\n\nAssistant:"


def test_stop_filter_holds_back_a_split_stop_string() -> None:
    f = StopFilter(["STOP"])
    out = [f.feed("hello S"), f.feed("T"), f.feed("O"), f.feed("P and more")]
    assert "".join(out) == "hello "
    assert f.stopped
    assert f.flush() == ""


def test_stop_filter_releases_held_text_at_the_end() -> None:
    f = StopFilter(["STOP"])
    assert f.feed("the end ST") == "the end"
    assert f.flush() == " ST"


def test_stop_filter_earliest_match_wins() -> None:
    f = StopFilter(["world", "lo"])
    assert f.feed("hello world") == "hel"


def test_settings_flags_win_over_environment() -> None:
    env = {
        "MODEL_PATH": "/models/x",
        "MAX_BATCH_SIZE": "8",
        "WORKER_API_KEY": "k",
        "WORKER_PORT": "9",
    }
    s = parse_settings(["--max-batch-size", "4"], env)
    assert (s.model, s.max_batch_size, s.api_key, s.port) == ("/models/x", 4, "k", 9)
    assert parse_settings([], {}).model == "demo"
    assert parse_settings([], {"PORT": "1", "HOST": "zsh-hostname"}).port == 8000
    assert parse_settings([], {"HOST": "zsh-hostname"}).host == "0.0.0.0"
    assert parse_settings([], {"MAX_QUEUE": "0"}).max_queue == 0
    with pytest.raises(SystemExit):
        parse_settings([], {"MAX_BATCH_SIZE": "many"})


def test_demo_model_never_overwrites_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "demo-model"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="not a demo model"):
        ensure_demo_model(target)
    assert (target / "precious.txt").read_text() == "keep me"


def test_demo_model_dir_is_under_the_cache_root(tmp_path: Path) -> None:
    from worker.demo import demo_model_dir

    assert demo_model_dir(str(tmp_path)) == tmp_path / "demo-model"


def test_demo_model_is_built_once_and_reused(demo_cache: Path) -> None:
    assert is_built(demo_cache)
    weights = demo_cache / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_demo_model(demo_cache) == demo_cache
    assert weights.stat().st_mtime_ns == before
