"""Time, in the one unit the project keeps: Unix milliseconds. :func:`now_ms` is the
project's one wall clock; :func:`parse_time` reads times as users type them
(ISO-8601 or Unix ms). No I/O."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

__all__ = ["now_ms", "parse_time"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_ms() -> int:
    """The wall clock in Unix ms: receipt times, delivery records, leases."""
    return time.time_ns() // 1_000_000


def parse_time(text: str) -> int:
    """``1750000000000`` or ``2025-06-15T15:06:40Z`` (a naive time is UTC) to Unix ms."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time (ISO-8601 or Unix ms): {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    # Integer arithmetic: float seconds would turn .005 into 4.999... ms.
    return (parsed - _EPOCH) // timedelta(milliseconds=1)
