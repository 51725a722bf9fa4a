"""The built-in change log: one compact JSON line per change on a text stream.

Each line is the change's :meth:`~consumer.PhaseChange.summary` (credentials already
hidden; ``idempotencyKey`` included, to deduplicate lines a redelivery repeats), so
``phasewatch serve | jq`` or a log shipper reading stdout sees every phase change as it
is delivered. Writing a line is synchronous and small; each call flushes so
a line is never held in a buffer across a crash.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

import orjson

from consumer import DeliveryPolicy, PhaseChange, Subscription
from handlers.subscribe import phase_set, subscription, type_set

__all__ = ["log_changes"]

_POLICY = DeliveryPolicy(
    # One writer: concurrent calls would only contend for the same stream.
    concurrency=1,
    timeout_s=10.0,
    # A line that cannot be written now (a full pipe) is worth a few tries, not a day.
    max_attempts=3,
    max_age_s=60.0,
)


class _LineWriter:
    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    async def __call__(self, change: PhaseChange) -> None:
        # Resolved per call, not at construction: sys.stdout may be replaced after the
        # subscription is built (pytest's capture, a service redirecting its output).
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(orjson.dumps(change.summary(), option=orjson.OPT_APPEND_NEWLINE).decode())
        stream.flush()


def log_changes(
    stream: TextIO | None = None,
    *,
    name: str = "log",
    updates: bool = False,
    phases: str | Iterable[str] = (),
    types: str | Iterable[str] = (),
) -> Subscription:
    """A subscription writing each change as one JSON line to ``stream`` (default stdout).

    ``updates=True`` also logs changes that are not phase changes (progress, output...).
    """
    return subscription(
        _LineWriter(stream),
        name=name,
        phases=phase_set(phases, what="phases"),
        types=type_set(types, what="types"),
        updates=updates,
        policy=_POLICY,
    )
