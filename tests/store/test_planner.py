"""Batches planned in the caller's process (a Kafka batch with record keys): the writer
process writes a plan only while what it assumed still holds, and otherwise folds the batch itself.

The behaviour suite in ``test_store.py`` runs against this path too (the
``sqlite-planned`` backend); these tests are about the plan going stale.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from consumer.core.codec import decode
from consumer.core.plan import Outcome
from consumer.store.sqlite.planner import Loaded, Planned, Planner, write_planned
from consumer.store.sqlite.process import SQLiteProcessStore
from consumer.store.sqlite.rows import Rows, read_for_planning
from consumer.store.sqlite.schema import begin_immediate
from consumer.store.sqlite.store import SQLiteStore
from tests.conftest import PlannedProcessStore
from tests.support import deliveries, snapshot, webhook_body


def ev(event_id: str, task_id: str, phase: str, t: int, **fields: object) -> bytes:
    return webhook_body(event_id, snapshot(task_id, phase, t, **fields))


def phases(changes: Any) -> list[tuple[str | None, str]]:
    return [(c.previous_phase, c.phase) for c in changes]


async def test_a_plan_made_stale_by_another_writer_is_refused_and_folded_anew(
    tmp_path: Path,
) -> None:
    path = tmp_path / "p.db"
    planned = PlannedProcessStore(path)
    other = SQLiteStore(path)  # a CLI import, or a second phasewatch on the same file
    await planned.open()
    await other.open()
    try:
        await planned.ingest_raw([ev("e1", "T", "pending", 1)], "kafka", 1)
        # The planner now believes T is pending; another writer moves it on.
        await other.ingest([decode(ev("e2", "T", "running", 2, progress=0.5))], "webhook", 2)
        result = await planned.ingest_raw([ev("e3", "T", "completed", 3)], "kafka", 3)
        # Folded against what the store holds, not what the planner believed.
        assert planned.plans_refused == 1
        assert phases(result.changes) == [("running", "completed")]
        assert phases(await planned.task_changes("T")) == [
            (None, "pending"),
            ("pending", "running"),
            ("running", "completed"),
        ]
        stored = await planned.get_task("T")
        assert stored is not None and stored.phase == "completed"
        assert stored.task["progress"] == 0.5  # e2's field, which e3 does not carry
        assert (planned.plans_used, planned.plans_refused) == (1, 1)
        # The planner forgot T: the next batch is planned from the store again, and used.
        nxt = await planned.ingest_raw([ev("e4", "T", "failed", 4)], "kafka", 4)
        assert phases(nxt.changes) == [("completed", "failed")]
        assert (planned.plans_used, planned.plans_refused) == (2, 1)
    finally:
        await other.close()
        await planned.close()


async def test_a_restarted_planner_knows_what_the_history_holds(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    batch = [ev("e1", "T", "pending", 1), ev("e2", "T", "running", 2), ev("x", "U", "waiting", 1)]
    first = PlannedProcessStore(path)
    await first.open()
    try:
        await first.ingest_raw(batch, "kafka", 1)
    finally:
        await first.close()
    # Kafka redelivers the batch to a new process after a crash.
    again = PlannedProcessStore(path)
    await again.open()
    try:
        result = await again.ingest_raw(batch, "kafka", 2)
        assert result.outcomes == [Outcome.DUPLICATE] * 3 and result.changes == []
        assert again.plans_used == 1  # planned right, from the store's own rows
        assert (await again.stats()).events == 3
    finally:
        await again.close()


async def test_events_of_a_lost_batch_are_not_reported_duplicates(tmp_path: Path) -> None:
    """A plan builds on the batches before it. When one of those is lost (its writer
    died), the events it carried must not count as stored in the batches after it."""
    store = PlannedProcessStore(tmp_path / "l.db")
    await store.open()
    try:
        store.kill_writer()
        with pytest.raises(RuntimeError, match="died"):
            await store.ingest_raw([ev("e1", "T", "pending", 1)], "kafka", 1)
        # The retry of the lost batch, and a batch that repeats its event.
        result = await store.ingest_raw([ev("e1", "T", "pending", 1)], "kafka", 2)
        assert result.outcomes == [Outcome.ACCEPTED]
        assert phases(result.changes) == [(None, "pending")]
    finally:
        await store.close()


def test_the_writer_refuses_a_plan_whose_assumptions_fail(tmp_path: Path) -> None:
    """Directly: a plan that counts an unstored event as stored, or a stored one as new,
    or that started from another view row, writes nothing."""
    path = tmp_path / "w.db"
    asyncio.run(_seed(path))
    con = sqlite3.connect(path, isolation_level=None)

    def attempt(raws: list[bytes], tamper: Any) -> int | None:
        planner = Planner(_load_from(con), record_updates=False)
        plan = asyncio.run(planner.plan(raws, True))
        planned = tamper(plan.planned)
        begin_immediate(con)
        try:
            return write_planned(con, planned, "test", 9)
        finally:
            con.execute("ROLLBACK")

    fresh = [ev("e2", "T", "running", 2)]
    assert attempt(fresh, lambda p: p) is not None  # untampered: written
    assert attempt(fresh, lambda p: Planned(p.rows, p.assumed, [("T", "e2")])) is None

    def stored_as_new(p: Planned) -> Planned:
        events = [row._replace(event_id="e1") for row in p.rows.events]
        return Planned(Rows(events, p.rows.tasks, p.rows.changes), p.assumed, p.known)

    assert attempt(fresh, stored_as_new) is None
    assert attempt(fresh, lambda p: Planned(p.rows, {"T": (None, None)}, p.known)) is None
    (count,) = con.execute("SELECT count(*) FROM events").fetchone()
    assert count == 1  # only the seed
    con.close()


async def _seed(path: Path) -> None:
    store = SQLiteStore(path)
    await store.open()
    await store.ingest([decode(ev("e1", "T", "pending", 1))], "seed", 1)
    await store.close()


def _load_from(con: sqlite3.Connection) -> Any:
    async def load(task_ids: list[str], untasked: list[str]) -> Loaded:
        return Loaded(*read_for_planning(con, task_ids, untasked))

    return load


async def test_the_cache_is_bounded_but_keeps_what_batches_in_flight_need() -> None:
    async def nothing_stored(task_ids: list[str], untasked: list[str]) -> Loaded:
        return Loaded({}, set())

    planner = Planner(nothing_stored, record_updates=False, max_tasks=10)
    in_flight = [
        await planner.plan([ev(f"e{b}.{i}", f"T{b}.{i}", "pending", 1) for i in range(4)], True)
        for b in range(5)
    ]
    assert len(planner) == 20  # nothing answered yet: every entry may still be needed
    for plan in in_flight:
        planner.settle(plan, used=True)
    assert len(planner) == 10


async def test_planned_and_writer_folded_batches_store_the_same(tmp_path: Path) -> None:
    """The messy fixture, shuffled into batches, through both paths: the same view rows,
    versions, history and outbox, row for row."""
    raws = [d.body for d in deliveries("messy")]
    random.Random(7).shuffle(raws)
    batches = [raws[i : i + 97] for i in range(0, len(raws), 97)]
    tables = []
    for decode_here in (False, True):
        store = (PlannedProcessStore if decode_here else SQLiteProcessStore)(
            tmp_path / f"{decode_here}.db"
        )
        await store.open()
        try:
            for batch in batches:
                await store.ingest_raw(batch, "kafka", 1)
        finally:
            await store.close()
        with sqlite3.connect(tmp_path / f"{decode_here}.db") as con:
            tables.append(
                [
                    con.execute(sql).fetchall()
                    for sql in (
                        "SELECT id, phase, updated_at, version, doc, keys FROM tasks ORDER BY no",
                        "SELECT event_id, task_id, kind, created_at, raw FROM events ORDER BY seq",
                        "SELECT seq, task_id, event_id, previous_phase, phase, task FROM changes"
                        " ORDER BY seq",
                    )
                ]
            )
    unplanned, planned = tables
    assert planned == unplanned
    assert len(planned[2]) > 500  # the outbox was exercised, not empty on both sides


async def test_an_answer_that_arrives_while_the_store_is_read_loses_no_entry() -> None:
    """The planner reads the store for tasks it has not seen; meanwhile the writer may
    answer an earlier batch, and a refused answer drops that batch's tasks. The batch
    being planned must still find every task it needs."""
    earlier: list[Any] = []

    async def load(task_ids: list[str], untasked: list[str]) -> Loaded:
        if "B" in task_ids and earlier:
            planner.settle(earlier.pop(), used=False)  # drops A, which this batch needs
            await asyncio.sleep(0)
        return Loaded({}, set())

    planner = Planner(load, record_updates=False)
    earlier.append(await planner.plan([ev("e1", "A", "pending", 1)], True))
    plan = await planner.plan([ev("e2", "A", "running", 2), ev("x", "B", "pending", 1)], True)
    assert plan.outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert set(plan.planned.assumed) == {"A", "B"}
