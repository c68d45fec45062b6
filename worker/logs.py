"""The worker's logging: wire.logs' setup, plus transformers' loggers brought into it."""

from __future__ import annotations

import logging
import os

from wire import logs as shared_logging


def configure(level: str | None = None) -> None:
    as_json = shared_logging.wants_json()
    handler = shared_logging.configure(as_json, level)
    # transformers' batching logger brings its own plain-text handler; give it ours.
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    cb_logger.handlers[:] = [handler]
    cb_logger.propagate = False
    if as_json:
        # Progress bars are noise in JSON logs.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
