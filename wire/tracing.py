"""Whether traces are on, from the standard OTEL_* variables alone (gateway and worker alike).

Off unless an OTLP endpoint is set. The tracing SDK is imported and set up only when they are
on, so a process without tracing has no tracer, queue or exporter thread, and does no work."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wire.tracing_sdk import Tracing

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

# Called with a reason ("queue_full", "export_failed") and a number of spans, from any thread.
OnDropped = Callable[[str, int], None]


def tracing_wanted(env: Mapping[str, str] = os.environ) -> bool:
    """An OTLP endpoint is set, and neither OTEL_SDK_DISABLED nor OTEL_TRACES_EXPORTER=none
    turns the SDK off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def start_tracing(
    service_name: str, on_dropped: OnDropped, env: Mapping[str, str] = os.environ
) -> Tracing | None:
    """A tracer exporting to the configured collector, or None when tracing is off."""
    if not tracing_wanted(env):
        return None
    from wire.tracing_sdk import Tracing

    return Tracing.from_environment(service_name, on_dropped, env)
