"""The endpoint map: the documented format, YAML, `${VAR}` interpolation, errors that say where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.routing import Snapshot

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env or {})
    assert caught.value.source == str(path)
    return caught.value.errors


def test_example_config_loads_as_it_is() -> None:
    config = load_config(ROOT / "config.example.json", {})
    assert "smollm2" in config.endpoints


def test_the_plain_format_from_the_design(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.json",
        json.dumps(
            {
                "endpoints": {
                    "llama-8b": {
                        "displayName": "Llama 3 8B (GPU)",
                        "url": "http://worker:8000/v1",
                        "apiKey": "${WORKER_API_KEY}",
                        "actualModelName": "meta-llama/Meta-Llama-3-8B-Instruct",
                    }
                }
            }
        ),
    )
    config = load_config(path, {"WORKER_API_KEY": "sk-from-env"})
    route = Snapshot(config, str(path), 1).resolve("llama-8b")
    (target,) = route.targets
    assert target.api_key == "sk-from-env"
    assert route.display_name == "Llama 3 8B (GPU)"
    assert target.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert str(target.base_url) == "http://worker:8000/v1"


def test_yaml_with_the_same_schema(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        """
endpoints:
  qwen:
    displayName: Qwen 7B
    url: http://${HOST:-localhost}:11434/v1
    actualModelName: qwen2.5:7b
timeouts:
  idle: 30
""",
    )
    config = load_config(path, {})
    assert config.endpoints["qwen"].url == "http://localhost:11434/v1"
    assert config.timeouts.idle == 30
    assert config.timeouts.connect == 10  # defaults kept


def test_interpolation_rules(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.json",
        json.dumps(
            {
                "endpoints": {
                    "m": {
                        "url": "http://${H}:${P:-8000}/v1",
                        "apiKey": "${EMPTY:-fallback}",
                        "displayName": "costs $$5 and $${NOT_A_VAR}",
                    }
                }
            }
        ),
    )
    endpoint = load_config(path, {"H": "gpu-1", "EMPTY": ""}).endpoints["m"]
    assert endpoint.url == "http://gpu-1:8000/v1"
    assert endpoint.api_key == "fallback"
    assert endpoint.display_name == "costs $$5 and ${NOT_A_VAR}"


def test_missing_variable_names_it_and_where(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.json",
        '{"endpoints": {"llama-8b": {"url": "http://x/v1", "apiKey": "${OPENAI_KEY}"}}}',
    )
    (error,) = errors_of(path)
    assert error.startswith("endpoints.llama-8b.apiKey:")
    assert "OPENAI_KEY" in error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"endpoints": {"llama-8b": {"url": "localhost:8000"}}}',
            "endpoints.llama-8b.url: must be an http(s) URL",
        ),
        (
            '{"endpoints": {"llama-8b": {"url": "http://x/v1", "apikey": "k"}}}',
            "endpoints.llama-8b.apikey: unknown key",
        ),
        (
            '{"endpoints": {"llama-8b": {"displayName": "x"}}}',
            "endpoints.llama-8b: needs `url` (one backend) or `backends` (several)",
        ),
        ('{"endpoints": {}}', "endpoints: at least one endpoint is needed"),
        ('{"endpoint": {}}', "endpoint: unknown key"),
        (
            '{"endpoints": {"m": {"url": "http://x", "timeouts": {"idle": 0}}}}',
            "endpoints.m.timeouts.idle:",
        ),
        ('{"endpoints": {"m": {"url": "http://x"}}, "maxRequestBytes": -1}', "maxRequestBytes:"),
        (
            '{"endpoints": {"m": {"url": "http://x", "headers": {"Host": "y"}}}}',
            "endpoints.m.headers:",
        ),
        ("[1]", "the top level must be an object"),
        ('{"endpoints": {"m": {"url": "http://x"}', "invalid JSON at line 1"),
    ],
)
def test_errors_say_where_and_what(tmp_path: Path, text: str, expected: str) -> None:
    errors = errors_of(write(tmp_path, "c.json", text))
    assert any(e.startswith(expected) for e in errors), errors


def test_invalid_yaml_gives_line(tmp_path: Path) -> None:
    (error,) = errors_of(write(tmp_path, "c.yml", "endpoints:\n  m: [unclosed\n"))
    assert error.startswith("invalid YAML at line")


def test_every_error_reported_at_once(tmp_path: Path) -> None:
    text = '{"endpoints": {"a": {"url": "nope"}, "b": {"url": "http://x", "bogus": 1}}}'
    errors = errors_of(write(tmp_path, "c.json", text))
    assert len(errors) == 2


def test_url_with_credentials_is_not_echoed(tmp_path: Path) -> None:
    (error,) = errors_of(
        write(tmp_path, "c.json", '{"endpoints": {"m": {"url": "ftp://u:pw-secret@x"}}}')
    )
    assert "pw-secret" not in error


def test_unreadable_file(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path / "missing.json")
    assert error.startswith("cannot read the file")


def test_per_endpoint_timeouts_override_globals(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.json",
        '{"timeouts": {"idle": 60}, "endpoints": {"m": {"url": "http://x", "timeouts": {"connect": 2}}, "n": {"url": "http://y"}}}',
    )
    snapshot = Snapshot(load_config(path, {}), str(path), 1)
    assert snapshot.resolve("m").timeouts.connect == 2
    assert snapshot.resolve("m").timeouts.idle == 60
    assert snapshot.resolve("n").timeouts.connect == 10


def test_plus_interpolation_and_enabled_switch(tmp_path: Path) -> None:
    """`"enabled": "${KEY:+true}"` turns an endpoint on only when KEY is set."""
    text = json.dumps(
        {
            "endpoints": {
                "local": {"url": "http://worker:8000/v1"},
                "hosted": {
                    "url": "https://api.example/v1",
                    "enabled": "${KEY:+true}",
                    "apiKey": "${KEY:-}",
                },
            }
        }
    )
    path = write(tmp_path, "c.json", text)
    off = Snapshot(load_config(path, {}), str(path), 1)
    assert list(off.routes) == ["local"]
    on = Snapshot(load_config(path, {"KEY": "sk-123456789"}), str(path), 1)
    assert list(on.routes) == ["local", "hosted"]
    assert on.resolve("hosted").targets[0].api_key == "sk-123456789"


def test_enabled_rejects_other_words(tmp_path: Path) -> None:
    path = write(
        tmp_path, "c.json", '{"endpoints": {"m": {"url": "http://x", "enabled": "maybe"}}}'
    )
    (error,) = errors_of(path)
    assert error.startswith("endpoints.m.enabled: must be true or false")
