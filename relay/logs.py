"""Logging set-up: one line per record on stderr, for a person (the default) or as JSON for a log
shipper, with levels per logger from `[logging]`.

What is logged is decided where it happens: one line per state change, prefixed with the object's
repr, never a key (README, "Logs").
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from relay.config import LoggingConfig

HUMAN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# trio-websocket logs the URL it opens, with the anon key in its query, at DEBUG.
KEY_LEAKING_LOGGERS = ("trio-websocket",)
# httpx logs every request at INFO: each reconcile's REST read would be a line, every 300 s per
# faction, which is not a state change. Their warnings still show; `[logging] levels` can lower them.
CHATTY_LOGGERS = ("httpx", "httpcore")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601, milliseconds), level, logger, message, and the
    exception's traceback as one string when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    config: LoggingConfig, *, level: str | None = None, stream: TextIO | None = None
) -> None:
    """Replace the root logger's handlers with one for `config` (`level` from the command line wins)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(HUMAN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or config.level)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, logger_level in config.levels:
        logging.getLogger(name).setLevel(logger_level)
    for name in KEY_LEAKING_LOGGERS:
        # Never below INFO, whatever the root level (config refuses a level for it below INFO).
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def _utc_iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
