"""Structured logs: `log.info("event", extra={"fields": {...}})`, as text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from service import principal


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class CallerFilter(logging.Filter):
    """Adds the caller (principal) to the fields of every record logged while serving an
    authenticated request; never a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        caller = principal.current()
        if caller != principal.ANONYMOUS:
            fields = getattr(record, "fields", None)
            fields = dict(fields) if isinstance(fields, dict) else {}
            fields.setdefault("principal", caller)
            record.fields = fields
        return True


class JsonFormatter(logging.Formatter):
    """{"ts": ..., "level": ..., "logger": ..., "event": message, **fields}"""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """2026-01-01T00:00:00 INFO service.server: listening grpc_port=8001 metrics_port=8002"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in fields_of(record).items())
        line = f"{stamp} {record.levelname} {record.name}: {record.getMessage()}"
        line = f"{line} {extra}" if extra else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(json_lines: bool, level: str) -> None:
    """Send every log record to stderr, as JSON lines or text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(CallerFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
