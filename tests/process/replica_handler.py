"""A handler for the replica tests: appends every call it gets, one JSON line each, to
the file named by PHASEWATCH_TEST_CALLS (read once, at import, like a user's module
would). Each replica gets a file of its own, so a line is never torn by another writer.

A line: ``[seq, task_id, event_id, previous_phase, phase, idempotency_key, pid]``."""

from __future__ import annotations

import os

import orjson

from consumer import PhaseChange

_PATH = os.environ.get("PHASEWATCH_TEST_CALLS", "")


async def record(change: PhaseChange) -> None:
    line = [
        change.seq,
        change.task_id,
        change.event_id,
        change.previous_phase,
        change.phase,
        change.idempotency_key,
        os.getpid(),
    ]
    with open(_PATH, "ab") as f:
        f.write(orjson.dumps(line) + b"\n")
