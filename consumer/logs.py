"""Logging as operators read it: plain text or one JSON object per line, an optional
access log, and credentials hidden in every line whatever logged it.

``PHASEWATCH_LOG_FORMAT=json`` writes each record as ``{"time", "level", "logger",
"message"}`` plus the context a record carries (``task_id``, ``handler``, ``event_id``,
``seq``, ``topic``, ``partition``, ``offset``; an access line's ``method``, ``path``,
``status``, ``duration_ms``, ``remote``) and ``exception`` for a traceback. Both formats
pass the final text through :func:`~consumer.core.secrets.redact_text`: a library or a
handler that logs a URL with userinfo or a bearer token does not leak it.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from consumer.core.secrets import redact_text

__all__ = ["ACCESS_LOGGER", "AccessLogger", "LogFormat", "configure"]

LogFormat = Literal["text", "json"]

ACCESS_LOGGER = "phasewatch.access"

# Context a record may carry (``extra=``): shown as fields in JSON, as is in text.
_CONTEXT = (
    "task_id",
    "handler",
    "event_id",
    "seq",
    "topic",
    "partition",
    "offset",
    "method",
    "path",
    "status",
    "duration_ms",
    "remote",
)


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        for key in _CONTEXT:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = redact_text(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exception"] = redact_text(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


# aiokafka logs these at ERROR while a group forms or a broker starts: conditions it
# retries by itself, and that phasewatch reports (readiness, start-up errors) if they last.
_TRANSIENT = (
    "GroupCoordinatorNotAvailable",
    "CoordinatorNotAvailable",
    "NotCoordinator",
    "CoordinatorLoadInProgress",
    "NodeNotReady",
    "Unable connect to",
    "Unable to update metadata",
)


class _TransientKafka(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiokafka") and record.levelno == logging.ERROR:
            text = record.getMessage()
            if any(mark in text for mark in _TRANSIENT):
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure(level: str, fmt: LogFormat = "text") -> None:
    """Set up the root logger once, at the edge (the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(_TransientKafka())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, duration, remote address."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d %.1f ms",
            request.method,
            request.path_qs,
            response.status,
            time * 1000,
            extra={
                "method": request.method,
                "path": request.path_qs,
                "status": response.status,
                "duration_ms": round(time * 1000, 2),
                "remote": request.remote,
            },
        )
