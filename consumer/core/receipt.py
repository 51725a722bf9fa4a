"""What phasewatch knows about how a message reached it, beyond its bytes. Pure: no I/O.

A :class:`Receipt` travels with a message into the store (``ingest_raw(...,
receipts=...)``, or :attr:`Event.receipt <consumer.core.codec.Event.receipt>`), which
keeps it with the event in the history (:attr:`HistoryEntry.receipt
<consumer.store.base.HistoryEntry.receipt>`); each phase change keeps the
``traceparent`` of the event that caused it. It is never part of the raw bytes and never
affects the fold or deduplication: a duplicate keeps the receipt of the first copy.

Stored as a small JSON object (:meth:`Receipt.encode`) whose unknown keys are ignored
when read back (:meth:`Receipt.decode`), so later versions can add fields and older
ones still read the history. An empty receipt (every field None) is stored as nothing
and reads back as None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Receipt", "valid_traceparent"]


@dataclass(frozen=True, slots=True)
class Receipt:
    """``secret``: the name (or 0-based index, as a string) of the webhook secret that
    verified the delivery, never the secret itself; None when unsigned or not a webhook.
    ``traceparent``: the W3C trace context of the request that delivered it (see
    :func:`valid_traceparent`)."""

    secret: str | None = None
    traceparent: str | None = None

    def encode(self) -> str | None:
        """Compact JSON with the fields that are set; None when none is."""
        doc = {
            name: value
            for name, value in (("secret", self.secret), ("traceparent", self.traceparent))
            if value is not None
        }
        return orjson.dumps(doc).decode() if doc else None

    @classmethod
    def decode(cls, text: str | bytes | None) -> Receipt | None:
        """What :meth:`encode` wrote. Tolerant: unknown keys are ignored, and a value of
        the wrong type, or text that is not a JSON object, reads as absent (a receipt is
        metadata: it never makes a history unreadable)."""
        if not text:
            return None
        try:
            doc: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict):
            return None
        receipt = cls(_text(doc.get("secret")), _text(doc.get("traceparent")))
        return None if receipt == _EMPTY else receipt


_EMPTY = Receipt()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


# version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex (W3C Trace Context,
# level 1, section 3.2). A later version may append "-" and fields of its own.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACEPARENT_00_LENGTH = 55


def valid_traceparent(value: str | None) -> str | None:
    """``value`` if it is a valid W3C ``traceparent`` header, else None.

    Version ``00`` must be exactly ``00-<32 hex trace id>-<16 hex parent id>-<2 hex
    flags>``, lowercase, with neither id all zeros. Version ``ff`` is invalid. A higher
    version is parsed as the specification asks of a version-00 implementation (the
    first four fields, then ``-`` or the end) and kept as the version-00 header that
    such an implementation would propagate. Surrounding spaces and tabs are ignored.
    """
    if value is None:
        return None
    text = value.strip(" \t")
    match = _TRACEPARENT.match(text)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    if version == "00":
        return text if len(text) == _TRACEPARENT_00_LENGTH else None
    if len(text) > _TRACEPARENT_00_LENGTH and text[_TRACEPARENT_00_LENGTH] != "-":
        return None
    return f"00-{trace_id}-{parent_id}-{flags}"
