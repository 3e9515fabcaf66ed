"""Structured logging: one JSON object per line (or readable text for a terminal).

Fields passed with ``extra={"audit": {...}}`` or any other ``extra`` key land as top-level JSON
fields, so audit lines are machine-readable. Callers never log request bodies or credentials.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """Formats records as single-line JSON with time, level, logger, message and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record."""
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            if isinstance(value, dict):
                data.update(value)
            else:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    """Readable single-line records for a terminal, extra fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record."""
        when = self.formatTime(record, "%H:%M:%S")
        base = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields: dict[str, Any] = {}
        for key, value in _extras(record).items():
            fields.update(value if isinstance(value, dict) else {key: value})
        if fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def configure(*, level: str, fmt: str) -> None:
    """Install the formatter on the root logger, writing to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
