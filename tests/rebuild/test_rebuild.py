"""Rebuild the view from the history: equals the live view, repairs a corrupted one,
survives interruption, and keeps events that arrive while it runs. On SQLite and on
PostgreSQL (the backends with a view to corrupt and a rebuild table to stage in)."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from consumer.core.codec import decode
from consumer.replay.job import Job
from consumer.replay.rebuild import Interrupted, rebuild
from consumer.store.postgres.store import PostgresStore
from consumer.store.sqlite.store import SQLiteStore
from tests.support import deliveries, expected_tasks, snapshot, webhook_body

Backend = SQLiteStore | PostgresStore


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    s: Backend
    if request.param == "postgres":
        # pg_url's way (an async fixture cannot be asked for from this one): a fresh
        # database on the session's server.
        server = request.getfixturevalue("pg_server")
        server.ensure_running()
        s = PostgresStore(await server.create_database())
    else:
        s = SQLiteStore(tmp_path / "r.db")
    await s.open()
    yield s
    await s.close()


async def corrupt(store: Backend, changed: str, deleted: str) -> None:
    """Corrupt the view behind phasewatch's back, in the backend's own SQL: one task's
    doc replaced, one task deleted, one task without history ('ghost') added."""
    bogus = orjson.dumps({"id": changed, "status": {"phase": "bogus", "updatedAt": 1}})
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as con:
            con.execute("UPDATE tasks SET doc = ? WHERE id = ?", (bogus, changed))
            con.execute("DELETE FROM tasks WHERE id = ?", (deleted,))
            con.execute(
                "INSERT INTO tasks (id, phase, updated_at, version, doc, keys) VALUES"
                " ('ghost', 'running', 1, 1, '{}', '{}')"
            )
        return
    con = await asyncpg.connect(store.url)
    try:
        async with con.transaction():
            await con.execute("UPDATE tasks SET doc = $1 WHERE id = $2", bogus, changed)
            await con.execute("DELETE FROM tasks WHERE id = $1", deleted)
            await con.execute(
                "INSERT INTO tasks (id, phase, updated_at, version, doc, keys) VALUES"
                " ('ghost', 'running', 1, 1, '{}'::bytea, '{}'::bytea)"
            )
    finally:
        await con.close()


async def ingest_messy(store: Backend) -> None:
    events = [decode(d.body) for d in deliveries("messy")]
    random.Random(3).shuffle(events)
    for start in range(0, len(events), 200):
        await store.ingest(events[start : start + 200], "webhook", 0)


async def view(store: Backend) -> dict[str, dict[str, object]]:
    out = {}
    for task_id in expected_tasks("messy"):
        stored = await store.get_task(task_id)
        assert stored is not None
        out[task_id] = stored.task
    return out


async def test_rebuild_equals_live_view_then_repairs_corruption(store: Backend) -> None:
    await ingest_messy(store)
    check = await rebuild(store, check=True)
    assert (check.missing, check.different, check.extra) == ([], [], 0)
    assert check.tasks == len(expected_tasks("messy"))

    victims = sorted(expected_tasks("messy"))[:3]
    await corrupt(store, victims[0], victims[1])
    check = await rebuild(store, check=True)
    assert check.different == [victims[0]]
    assert check.missing == [victims[1]]
    assert check.extra == 1

    report = await rebuild(store)
    assert report.tasks == len(expected_tasks("messy"))
    assert await view(store) == expected_tasks("messy")
    assert await store.get_task("ghost") is None
    assert (await rebuild(store, check=True)).different == []


async def test_interrupted_rebuild_resumes_and_keeps_late_events(store: Backend) -> None:
    await ingest_messy(store)

    def stop_after_two(batches: int) -> None:
        if batches == 2:
            raise KeyboardInterrupt  # as Ctrl-C would

    with pytest.raises(Interrupted):
        await rebuild(store, batch_tasks=100, job=Job(on_batch=stop_after_two))
    assert await view(store) == expected_tasks("messy")  # the live view is untouched

    # While it was stopped, new events arrived: a new task and a newer snapshot of an old one.
    old_id = sorted(expected_tasks("messy"))[0]
    newer = {
        **expected_tasks("messy")[old_id],
        "status": {"phase": "completed", "updatedAt": 9_999_999_999_999},
    }
    await store.ingest(
        [
            decode(webhook_body("late-1", snapshot("LATE", "pending", 5))),
            decode(webhook_body("late-2", newer)),
        ],
        "webhook",
        0,
    )

    report = await rebuild(store, batch_tasks=100)
    assert report.resumed
    stored = await store.get_task(old_id)
    assert stored is not None and stored.task["status"] == newer["status"]
    assert await store.get_task("LATE") is not None
    assert (await rebuild(store, check=True)).different == []
