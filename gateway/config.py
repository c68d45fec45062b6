"""The endpoint map: pydantic schema, JSON/YAML loading and `${VAR}` interpolation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
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


def _overrides(model: type[_Strict], name: str, types: Mapping[str, Any] | None = None) -> Any:
    """`model` with every field optional and unset by default (the same names, aliases and
    constraints): the settings an endpoint may override. `types` replaces a field's type."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        constraints = {k: v for m in info.metadata for k, v in dataclasses.asdict(m).items()}
        annotation = (types or {}).get(field_name, info.annotation)
        fields[field_name] = (annotation | None, Field(None, alias=info.alias, **constraints))
    return create_model(name, __base__=_Strict, __module__=model.__module__, **fields)


TimeoutsOverride = _overrides(Timeouts, "TimeoutsOverride")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
_RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}

Strategy = Literal["least-busy", "weighted-round-robin", "priority", "cache-aware"]


def _check_url(value: str) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        # The value itself is not echoed: a URL may carry credentials.
        raise ValueError("must be an http(s) URL with a host, such as http://host:8000/v1")
    if url.query_string or url.fragment:
        raise ValueError("must not carry a query string or fragment")
    return value


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    bad = sorted(name for name in value if name.lower() in _RESERVED_HEADERS)
    if bad:
        raise ValueError(f"headers the gateway sets itself cannot be configured: {bad}")
    return value


HttpUrl = Annotated[str, AfterValidator(_check_url)]
Headers = Annotated[dict[str, str], AfterValidator(_check_headers)]


class HealthCheck(_Strict):
    """Active probes: off unless `interval` is set. They cost a `GET <url>/models`, never a
    completion; passive detection from real traffic does most of the work."""

    interval: float | None = Field(None, gt=0)
    path: str = "/models"
    timeout: float = Field(5.0, gt=0)


class CircuitBreaker(_Strict):
    """`failures` consecutive failures eject a backend for `cooldown` seconds; then one
    request probes it (half-open) and its outcome closes or re-opens the breaker."""

    failures: int = Field(3, ge=1)
    cooldown: float = Field(30.0, gt=0)


class CacheAware(_Strict):
    """Settings of the `cache-aware` strategy (see the README's "Cache-aware routing")."""

    # Headers whose value names a conversation; the first one present is used.
    session_headers: list[str] = Field(
        default_factory=lambda: ["X-OpenWebUI-Chat-Id", "X-Session-Id"], alias="sessionHeaders"
    )
    # Fleet imbalance (as SGLang): max - min load above `balanceAbs` and max above
    # `balanceRel` x min sends the request to the least loaded backend.
    balance_abs: float = Field(8.0, ge=0, alias="balanceAbs")
    balance_rel: float = Field(1.5, ge=1, alias="balanceRel")
    # Bounded loads: the cache-preferred backend is skipped above
    # max((1 + epsilon) x mean, mean + margin).
    epsilon: float = Field(0.25, ge=0)
    margin: float = Field(2.0, ge=0)
    # A match shorter than this (estimated tokens) is no reason to prefer a backend.
    min_match_tokens: int = Field(32, ge=0, alias="minMatchTokens")
    # Saturation: a backend whose scraped queue or KV usage is over these is left out first.
    max_waiting: float = Field(8.0, ge=0, alias="maxWaiting")
    max_kv_usage: float = Field(0.95, gt=0, le=1, alias="maxKvUsage")
    # The backends' own /metrics, at their origin: how often, where, and when a reading is
    # too old to trust.
    metrics_interval: float = Field(0.5, gt=0, alias="metricsInterval")
    metrics_path: str = Field("/metrics", alias="metricsPath")
    metrics_stale_after: float = Field(2.0, gt=0, alias="metricsStaleAfter")
    # Prefill wait: the chosen backend gives way to one the guard allows that would answer
    # sooner by more than `prefillSlack` tokens (the uncached prefill of our requests queued
    # there that have not answered yet, plus this request's own).
    prefill_wait: bool = Field(True, alias="prefillWait")
    prefill_slack: int = Field(512, ge=0, alias="prefillSlack")
    # Sessions remembered (LRU) per route.
    max_sessions: int = Field(100_000, ge=1, alias="maxSessions")

    @field_validator("metrics_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value


class Backend(_Strict):
    """One server of a model. Keys left out take the endpoint's values."""

    url: HttpUrl
    api_key: str | None = Field(None, alias="apiKey")
    actual_model_name: str | None = Field(None, alias="actualModelName")
    headers: Headers = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0)
    max_concurrent: int | None = Field(None, ge=1, alias="maxConcurrent")
    # Its prefix-cache size in tokens, for the cache-aware index; default: read from its
    # /metrics (vLLM), else DEFAULT_CACHE_TOKENS.
    cache_tokens: int | None = Field(None, ge=16, alias="cacheTokens")
    # "dns": one backend per address the URL's host resolves to, re-resolved every
    # discoverInterval seconds (gateway/dns_discovery.py).
    discover: Literal["dns"] | None = None
    discover_interval: float = Field(10.0, gt=0, alias="discoverInterval")
    # Stream resume for this backend alone; unset takes the endpoint's `resume`.
    resume: bool | None = None


class Routing(_Strict):
    """Routing settings: the top level's are every endpoint's defaults."""

    timeouts: Timeouts = Timeouts()
    strategy: Strategy = "least-busy"
    # Further attempts after the first, only while nothing has reached the client yet.
    retries: int = Field(2, ge=0, le=10)
    retry_on: list[int] = Field(default_factory=lambda: [429, 500, 502, 503, 504], alias="retryOn")
    # How long a request may wait for a backend under its maxConcurrent before a 503.
    queue_timeout: float = Field(10.0, ge=0, alias="queueTimeout")
    health_check: HealthCheck = Field(default_factory=HealthCheck, alias="healthCheck")
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker, alias="circuitBreaker")
    cache_aware: CacheAware = Field(default_factory=CacheAware, alias="cacheAware")


# Routing settings an endpoint may set for itself; unset ones come from the top level.
RoutingOverrides = _overrides(Routing, "RoutingOverrides", {"timeouts": TimeoutsOverride})


class Endpoint(RoutingOverrides):
    """One public model id and the backend(s) that serve it: `url` for one, `backends` for
    several. An id ending in `/*` is a wildcard route (`ollama/*` serves `ollama/<anything>`)."""

    url: HttpUrl | None = None
    backends: list[Backend] | None = None
    # A string so that `"${OPENAI_API_KEY:+true}"` can switch an endpoint on from the environment.
    enabled: bool = True
    display_name: str | None = Field(None, alias="displayName")
    api_key: str | None = Field(None, alias="apiKey")
    actual_model_name: str | None = Field(None, alias="actualModelName")
    headers: Headers = Field(default_factory=dict)
    discover: Literal["dns"] | None = None
    discover_interval: float = Field(10.0, gt=0, alias="discoverInterval")
    # Wildcard routes: how often the backend's own model list is refreshed.
    models_refresh: float = Field(60.0, gt=0, alias="modelsRefresh")
    # Stream resume: a stream cut after its first byte goes on on another backend. Off by
    # default: hosted APIs cannot continue a partial assistant message.
    resume: bool = False
    max_resumes: int = Field(2, ge=0, le=10, alias="maxResumes")  # seams per stream

    @field_validator("enabled", mode="before")
    @classmethod
    def _flag(cls, value: object) -> object:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError("must be true or false (or an empty string, meaning false)")
        return value

    @field_validator("backends")
    @classmethod
    def _some_backends(cls, value: list[Backend] | None) -> list[Backend] | None:
        if value is not None and not value:
            raise ValueError("list at least one backend, or use `url` instead")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Endpoint:
        if self.url is None and self.backends is None:
            raise ValueError("needs `url` (one backend) or `backends` (several)")
        if self.url is not None and self.backends is not None:
            raise ValueError("give `url` (one backend) or `backends` (several), not both")
        return self


class ClientKey(_Strict):
    """A person's or an app's key: which models it may use, and its limits."""

    name: str = Field(min_length=1)
    # The key itself, or `sha256:<hex>` of it so the file holds no secret.
    key: str = Field(min_length=1)
    models: list[str] = Field(default_factory=lambda: ["*"])  # ids or globs (`llama-*`)
    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens per minute (prompt + completion, from usage)
    max_concurrent: int | None = Field(None, ge=1, alias="maxConcurrent")

    @field_validator("key")
    @classmethod
    def _key_or_digest(cls, value: str) -> str:
        if value.startswith("sha256:"):
            digest = value.removeprefix("sha256:")
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise ValueError("a `sha256:` key must be followed by 64 hex digits")
        elif len(value) < 8:
            raise ValueError("keys must be at least 8 characters")
        return value


class GatewayConfig(Routing):
    endpoints: dict[str, Endpoint]
    # Client keys: when any is listed, every API request needs one of them.
    keys: list[ClientKey] = Field(default_factory=list)
    # Optional JSON-lines file with one usage record per request.
    usage_log: str | None = Field(None, alias="usageLog")
    allow_origins: list[str] = Field(default_factory=list, alias="allowOrigins")
    # Vision requests carry base64 images, so the default is far above aiohttp's 1 MiB.
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, alias="maxRequestBytes")
    # Shared rate-limit windows, concurrency and usage for several processes or machines.
    redis_url: str | None = Field(None, alias="redisUrl")
    # With Redis unreachable: keep serving on this process's own limits (true), or 503.
    redis_fail_open: bool = Field(True, alias="redisFailOpen")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if not value:  # `${REDIS_URL:-}` left unset: no Redis
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redisUrl must start with redis://, rediss:// or unix://")
        return value

    @field_validator("keys")
    @classmethod
    def _unique_keys(cls, value: list[ClientKey]) -> list[ClientKey]:
        names = [k.name for k in value]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"key names must be unique: {duplicated}")
        return value

    @field_validator("endpoints")
    @classmethod
    def _valid_ids(cls, value: dict[str, Endpoint]) -> dict[str, Endpoint]:
        if not value:
            raise ValueError("at least one endpoint is needed")
        for model_id, endpoint in value.items():
            if not model_id.strip() or model_id != model_id.strip():
                raise ValueError(f"model id {model_id!r} is empty or has surrounding spaces")
            if model_id.endswith("/*") and (
                endpoint.actual_model_name
                or any(b.actual_model_name for b in endpoint.backends or [])
            ):
                raise ValueError(
                    f"{model_id}: a wildcard route passes the model name through; "
                    "actualModelName does not apply"
                )
            if "*" in model_id.removesuffix("/*"):
                raise ValueError(f"{model_id}: only a trailing `/*` is a wildcard")
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


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """A setting from the environment, None when unset or empty: compose's `${VAR:-}` sets
    every variable it lists, so an empty one must mean "not given", never "given as nothing"."""
    return env.get(name, "").strip() or None


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
