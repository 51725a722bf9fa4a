"""Time, in the one unit the project keeps: Unix milliseconds. :func:`now_ms` is the
project's one wall clock; :func:`parse_time` reads times as users type them
(ISO-8601 or Unix ms). No I/O."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

__all__ = ["MAX_MS", "MIN_MS", "now_ms", "parse_time"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Years 1 to 9999, what ISO-8601 (and datetime) can spell; also well inside the signed
# 64-bit integers a database column holds.
MIN_MS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // timedelta(
    milliseconds=1
)


def now_ms() -> int:
    """The wall clock in Unix ms: receipt times, delivery records, leases."""
    return time.time_ns() // 1_000_000


def parse_time(text: str) -> int:
    """``1750000000000`` or ``2025-06-15T15:06:40Z`` (a naive time is UTC) to Unix ms."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        if len(text) > 20 or not MIN_MS <= int(text) <= MAX_MS:
            raise ValueError("time out of range: Unix ms must be within the years 1 to 9999")
        return int(text)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        # The text itself is not repeated: it may come from a request.
        raise ValueError("not a time: expected ISO-8601 or Unix milliseconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    # Integer arithmetic: float seconds would turn .005 into 4.999... ms.
    return (parsed - _EPOCH) // timedelta(milliseconds=1)
