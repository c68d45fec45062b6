"""The endpoint map: pydantic schema, JSON/YAML loading and `${VAR}` interpolation."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from yarl import URL


class ConfigError(Exception):
    """A config file that cannot be used; `errors` are readable lines naming file and path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Timeouts(_Strict):
    """Seconds; `null` disables one. Defaults never cut a long generation that keeps streaming."""

    connect: float | None = Field(10.0, gt=0)
    # Non-stream responses arrive only when generation ends, so the first byte may be slow.
    first_byte: float | None = Field(600.0, gt=0, alias="firstByte")
    idle: float | None = Field(300.0, gt=0)
    total: float | None = Field(None, gt=0)


class TimeoutsOverride(_Strict):
    connect: float | None = Field(None, gt=0)
    first_byte: float | None = Field(None, gt=0, alias="firstByte")
    idle: float | None = Field(None, gt=0)
    total: float | None = Field(None, gt=0)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


class Endpoint(_Strict):
    """One public model id and the backend that serves it."""

    url: str
    # A string so that `"${OPENAI_API_KEY:+true}"` can switch an endpoint on from the environment.
    enabled: bool = True
    display_name: str | None = Field(None, alias="displayName")
    api_key: str | None = Field(None, alias="apiKey")
    actual_model_name: str | None = Field(None, alias="actualModelName")
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: TimeoutsOverride | None = None

    @field_validator("enabled", mode="before")
    @classmethod
    def _flag(cls, value: object) -> object:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError("must be true or false (or an empty string, meaning false)")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            # The value itself is not echoed: a URL may carry credentials.
            raise ValueError("must be an http(s) URL with a host, such as http://host:8000/v1")
        if url.query_string or url.fragment:
            raise ValueError("must not carry a query string or fragment")
        return value

    @field_validator("headers")
    @classmethod
    def _no_reserved_headers(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {"host", "content-length", "transfer-encoding", "connection"}
        bad = sorted(name for name in value if name.lower() in reserved)
        if bad:
            raise ValueError(f"headers the gateway sets itself cannot be configured: {bad}")
        return value


class GatewayConfig(_Strict):
    endpoints: dict[str, Endpoint]
    timeouts: Timeouts = Timeouts()
    allow_origins: list[str] = Field(default_factory=list, alias="allowOrigins")
    # Vision requests carry base64 images, so the default is far above aiohttp's 1 MiB.
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, alias="maxRequestBytes")

    @field_validator("endpoints")
    @classmethod
    def _valid_ids(cls, value: dict[str, Endpoint]) -> dict[str, Endpoint]:
        if not value:
            raise ValueError("at least one endpoint is needed")
        for model_id in value:
            if not model_id.strip() or model_id != model_id.strip():
                raise ValueError(f"model id {model_id!r} is empty or has surrounding spaces")
        return value


# ${VAR}, ${VAR:-default} (when unset or empty), ${VAR:+word} (when set and non-empty), as in
# the shell and docker compose; `$${` writes a literal `${`.
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\+)([^}]*))?\}")


def interpolate(
    value: Any, env: Mapping[str, str], path: str = "", errors: list[str] | None = None
) -> Any:
    """Replace `${VAR}` in every string of a parsed document; missing variables go to `errors`."""
    errors = [] if errors is None else errors
    if isinstance(value, dict):
        return {k: interpolate(v, env, _join(path, k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, operator, word = match.group(1), match.group(2), match.group(3)
        found = env.get(name)
        if operator == ":+":
            return word if found else ""
        if found:  # like the shell's `:-`, an empty variable takes the default too
            return found
        if operator == ":-":
            return word
        if found is None:
            errors.append(
                f"{path}: environment variable {name} is not set "
                f"(write ${{{name}:-}} to allow that)"
            )
        return ""

    return _VAR.sub(substitute, value)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _pydantic_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = _location(err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        else:
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return lines


def parse_document(text: str, source: str) -> Any:
    """JSON or YAML by file extension; a file named otherwise is tried as JSON, then YAML."""
    is_yaml = source.endswith((".yaml", ".yml"))
    try:
        if is_yaml:
            return yaml.safe_load(text)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            if source.endswith(".json"):
                raise ConfigError(
                    source, [f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"]
                ) from None
            return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"invalid YAML{where}: {problem}"]) from None


def parse_config(document: Any, source: str, env: Mapping[str, str] | None = None) -> GatewayConfig:
    if not isinstance(document, dict):
        raise ConfigError(source, ['the top level must be an object with an "endpoints" key'])
    errors: list[str] = []
    resolved = interpolate(document, os.environ if env is None else env, "", errors)
    if errors:
        raise ConfigError(source, errors)
    try:
        return GatewayConfig.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(source, _pydantic_errors(exc)) from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, interpolate and validate a config file; any problem raises ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            source, [f"cannot read the file: {exc.__class__.__name__}: {exc}"]
        ) from None
    return parse_config(parse_document(text, source), source, env)
