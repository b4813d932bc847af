"""Log set-up: plain text for people, one JSON object per line for log collectors.

The level, verbosity and format can change at run time through Triton's LogSettings
(`log_settings`, `update_log_settings`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from ..core.errors import InvalidInput, shorten

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: time, level, logger, message, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Log formats: ours (text, json) and Triton's (default = text, ISO8601 = text with ISO times).
LOG_FORMATS = ("text", "json", "default", "ISO8601")
_current_format = "text"
_handler: logging.Handler | None = None  # the handler configure_logging installed


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "ISO8601":
        iso = logging.Formatter(_TEXT, "%Y-%m-%dT%H:%M:%SZ")
        iso.converter = time.gmtime
        return iso
    return logging.Formatter(_TEXT)


def configure_logging(level: str, fmt: str) -> None:
    """Send logs to stderr in the chosen format (text or json) at the chosen level."""
    global _current_format, _handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    _current_format, _handler = fmt, handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


LogValue = bool | int | str


def log_settings() -> dict[str, LogValue]:
    """The log settings under Triton's names, read from the root logger."""
    level = logging.getLogger().getEffectiveLevel()
    return {
        "log_file": "",  # always stderr
        "log_info": level <= logging.INFO,
        "log_warning": level <= logging.WARNING,
        "log_error": level <= logging.ERROR,
        "log_verbose_level": 1 if level <= logging.DEBUG else 0,
        "log_format": _current_format,
    }


def update_log_settings(changes: Mapping[str, LogValue]) -> dict[str, LogValue]:
    """Apply LogSettings changes at run time; returns the settings now in force."""
    global _current_format
    current = log_settings()
    for key, value in changes.items():
        if key not in current:
            raise InvalidInput(
                f"unknown log setting '{shorten(key)}'; the settings are: {', '.join(current)}"
            )
        expected = type(current[key])
        if type(value) is not expected:
            raise InvalidInput(f"log setting {key} takes a {expected.__name__} value")
    if changes.get("log_file", ""):
        raise InvalidInput("log_file cannot be set: the server logs to stderr")
    fmt = changes.get("log_format", _current_format)
    if fmt not in LOG_FORMATS:
        raise InvalidInput(f"log_format must be one of {', '.join(LOG_FORMATS)}")
    flags = {**current, **changes}
    if flags["log_verbose_level"]:
        level = logging.DEBUG
    elif flags["log_info"]:
        level = logging.INFO
    elif flags["log_warning"]:
        level = logging.WARNING
    elif flags["log_error"]:
        level = logging.ERROR
    else:
        level = logging.CRITICAL
    root = logging.getLogger()
    root.setLevel(level)
    if fmt != _current_format:
        if _handler is not None:
            _handler.setFormatter(_formatter(str(fmt)))
        _current_format = str(fmt)
    return log_settings()
