"""Raw bytes to an :class:`Event` (spec §2 and §3). Pure: no I/O.

Three formats are detected per message:

``webhook``  a Livepeer webhook body ``{"id", "webhookId", "createdAt", "timestamp",
             "event", "payload"}``, as POSTed to us or bridged onto Kafka verbatim;
``bus``      a Studio bus ``{"type": "webhook_event", "id", "timestamp", "event", ...}``;
``task``     a bare Task object (e.g. polled from ``GET /api/task/{id}``), whose event id is
             derived from its content so that re-polling the same state deduplicates.

Errors form one small hierarchy; each maps to one HTTP status and one DLQ reason::

    DecodeError                  the message cannot be used (never retried)
    ├── NotJSON          400     not UTF-8 JSON, or not a JSON object
    ├── NotAnEvent       400     JSON, but none of the three formats
    └── InvalidEvent     422     an event whose task cannot be used (no id, no
        │                        status.phase, non-numeric status.updatedAt, ...)
        └── TooDeep      422     nested deeper than :data:`MAX_DEPTH` levels: more
                                 than the store's encoder could write back (orjson
                                 refuses 255+ levels), so refused here, never half-stored

The checks here are exactly the ones :class:`consumer.core.model.Task` is strict about (a test
holds the two in agreement); the full model is not built on the hot path because every
other field is accepted whatever its shape.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from consumer.core.model import is_number
from consumer.core.receipt import Receipt

__all__ = [
    "HTTP_STATUS",
    "MAX_DEPTH",
    "DecodeError",
    "Event",
    "EventFormat",
    "InvalidEvent",
    "NotAnEvent",
    "NotJSON",
    "TooDeep",
    "decode",
    "is_number",
]


class EventFormat(StrEnum):
    WEBHOOK = "webhook"
    BUS = "bus"
    TASK = "task"


class DecodeError(ValueError):
    """Base of all codec errors. ``reason`` is a short machine-readable code."""

    reason = "undecodable"
    http_status = 400


class NotJSON(DecodeError):
    reason = "not_json"
    http_status = 400


class NotAnEvent(DecodeError):
    reason = "not_an_event"
    http_status = 400


class InvalidEvent(DecodeError):
    reason = "invalid_event"
    http_status = 422


class TooDeep(InvalidEvent):
    reason = "too_deep"
    http_status = 422


MAX_DEPTH = 128
"""Deepest nesting of objects and arrays a message may have. Far above any real task (a
handful of levels) and far below orjson's encoder limit (254), leaving room for the
envelopes the API and the changes feed wrap a stored document in."""

HTTP_STATUS = {cls.reason: cls.http_status for cls in (NotJSON, NotAnEvent, InvalidEvent, TooDeep)}
"""The HTTP status a webhook sender gets for each decode error reason."""


@dataclass(slots=True)
class Event:
    """One accepted event. Task events carry a snapshot; others (asset.*, ...) do not.
    Treat it as immutable (not frozen only because a frozen dataclass takes four times as
    long to build, and every consumed message builds one).

    ``snapshot`` is the Task object exactly as received (a JSON object), ``raw`` the bytes
    as received, kept for the history and for replays. ``receipt``: how it reached us
    (which webhook secret verified it, the request's trace context), set after decoding
    by whoever received it; not part of the bytes, never read by the fold or dedup.
    """

    id: str
    kind: str
    format: EventFormat
    created_at: int | float
    raw: bytes
    task_id: str | None = None
    snapshot: dict[str, Any] | None = None
    receipt: Receipt | None = None

    @property
    def is_task_event(self) -> bool:
        return self.snapshot is not None

    @property
    def updated_at(self) -> int | float | None:
        return None if self.snapshot is None else self.snapshot["status"]["updatedAt"]

    @property
    def phase(self) -> str | None:
        return None if self.snapshot is None else self.snapshot["status"]["phase"]


def decode(raw: bytes) -> Event:
    """Decode one message. Raises a :class:`DecodeError` subclass saying what is wrong."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise NotJSON(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise NotJSON(f"body must be a JSON object, got {type(doc).__name__}")
    # Nesting cannot exceed the number of brackets, which bytes.count finds at C speed:
    # only a message with that many is walked.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and depth(doc) > MAX_DEPTH:
        raise TooDeep(f"message is nested more than {MAX_DEPTH} levels deep")
    return decode_object(doc, raw)


def depth(value: Any) -> int:
    """How deeply objects and arrays nest in a JSON value (a scalar is 0). Iterative: a
    hostile document must not exhaust the interpreter's stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def decode_object(doc: dict[str, Any], raw: bytes) -> Event:
    """Decode an already-parsed JSON object (``raw`` is kept as the event's bytes)."""
    event_name = doc.get("event")
    if isinstance(event_name, str) and "payload" in doc:
        fmt = EventFormat.BUS if doc.get("type") == "webhook_event" else EventFormat.WEBHOOK
        return _envelope(doc, raw, event_name, fmt)
    if "status" in doc and "id" in doc and "event" not in doc:
        return _bare_task(doc, raw)
    raise NotAnEvent(
        "JSON object is not a Livepeer event: expected a webhook body with 'event' and "
        "'payload', a bus 'webhook_event', or a bare Task with 'id' and 'status'"
    )


def _envelope(doc: dict[str, Any], raw: bytes, event_name: str, fmt: EventFormat) -> Event:
    event_id = doc.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise InvalidEvent("event 'id' must be a non-empty string (it is the idempotency key)")
    # Webhook bodies carry createdAt; bus messages only their timestamp.
    created_at = doc.get("createdAt", doc.get("timestamp", 0))
    if not is_number(created_at):
        raise InvalidEvent("event 'createdAt' must be a number (Unix milliseconds)")
    payload = doc["payload"]
    if not event_name.startswith("task."):
        # asset.*, stream.*, ...: acknowledged and kept in the history, touch no task.
        return Event(event_id, event_name, fmt, created_at, raw)
    if not isinstance(payload, dict) or not isinstance(payload.get("task"), dict):
        raise InvalidEvent("a task.* event has no 'payload.task' object")
    envelope_task = payload["task"]
    snapshot = envelope_task.get("snapshot")
    if not isinstance(snapshot, dict):
        raise InvalidEvent("a task.* event has no 'payload.task.snapshot' object")
    outer_id = envelope_task.get("id")
    if "id" not in snapshot and isinstance(outer_id, str) and outer_id:
        # The envelope names the task even when a producer trimmed the snapshot.
        snapshot = {"id": outer_id, **snapshot}
    task_id = _check_task(snapshot, "payload.task.snapshot")
    if outer_id is not None and outer_id != task_id:
        raise InvalidEvent("payload.task.id differs from payload.task.snapshot.id")
    return Event(event_id, event_name, fmt, created_at, raw, task_id, snapshot)


def _bare_task(doc: dict[str, Any], raw: bytes) -> Event:
    task_id = _check_task(doc, "task")
    # Same content, same id: polling an unchanged task twice is a duplicate.
    digest = hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()
    created_at = doc["status"]["updatedAt"]
    return Event(
        f"task-sha256:{digest[:40]}",
        "task.snapshot",
        EventFormat.TASK,
        created_at,
        raw,
        task_id,
        doc,
    )


def _check_task(task: dict[str, Any], where: str) -> str:
    """The three things a task event cannot do without (mirrors consumer.core.model.Task)."""
    task_id = task.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise InvalidEvent(f"{where}.id must be a non-empty string")
    status = task.get("status")
    if not isinstance(status, dict):
        raise InvalidEvent(f"{where}.status must be an object")
    phase = status.get("phase")
    if not isinstance(phase, str) or not phase:
        raise InvalidEvent(f"{where}.status.phase must be a non-empty string")
    if not is_number(status.get("updatedAt")):
        raise InvalidEvent(f"{where}.status.updatedAt must be a number (Unix milliseconds)")
    return task_id
