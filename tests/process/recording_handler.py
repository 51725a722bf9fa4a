"""A handler for process tests: appends each change it receives to a JSONL file named by
PHASEWATCH_TEST_RECORD (read once, at import, like a user's module would)."""

from __future__ import annotations

import asyncio
import os

import orjson

from consumer import PhaseChange

_PATH = os.environ.get("PHASEWATCH_TEST_RECORD", "")


async def record(change: PhaseChange) -> None:
    with open(_PATH, "ab") as f:
        f.write(
            orjson.dumps([change.seq, change.task_id, change.previous_phase, change.phase]) + b"\n"
        )


async def record_slow(change: PhaseChange) -> None:
    """Like ``record``, a little slower (so a kill lands mid-dispatch), with the pid."""
    await asyncio.sleep(0.005)
    with open(_PATH, "ab") as f:
        f.write(orjson.dumps([change.seq, os.getpid()]) + b"\n")
