"""A no-op handler for bench/dispatch_latency.py: notes when each call starts.

The start times are kept in memory (no I/O on the measured path) and written to
PHASEWATCH_BENCH_LATENCY_OUT when the service stops.
"""

from __future__ import annotations

import os
import time

import orjson

from consumer import PhaseChange, Subscription

_OUT = os.environ.get("PHASEWATCH_BENCH_LATENCY_OUT", "latency-starts.jsonl")
_starts: list[tuple[str, int]] = []


async def _noop(change: PhaseChange) -> None:
    _starts.append((change.event_id, time.time_ns()))


async def _dump() -> None:
    with open(_OUT, "wb") as f:  # noqa: ASYNC230 - once, at shutdown
        for event_id, started in _starts:
            f.write(orjson.dumps([event_id, started]) + b"\n")


noop = Subscription(name="bench-noop", fn=_noop, on_stop=_dump, concurrency=64)
