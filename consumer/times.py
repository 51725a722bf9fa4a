"""Times as users type them (ISO-8601 or Unix milliseconds) to Unix milliseconds. Pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["parse_time"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
