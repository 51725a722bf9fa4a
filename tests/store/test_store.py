"""One behaviour suite, run against every backend (memory and SQLite)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from consumer.core.codec import decode
from consumer.core.plan import Outcome
from consumer.store.base import Cursor, Delivery, DeliveryStatus, Store, StoreOpenError, TaskQuery
from consumer.store.sqlite.process import SQLiteProcessStore
from consumer.store.sqlite.store import SQLiteStore
from tests.support import deliveries, expected_tasks, snapshot, webhook_body


def ev(event_id: str, task_id: str, phase: str, t: int, **fields: object) -> bytes:
    return webhook_body(event_id, snapshot(task_id, phase, t, **fields))


async def test_ingest_folds_and_records_changes(store: Store) -> None:
    result = await store.ingest(
        [decode(ev("e1", "T", "pending", 1)), decode(ev("e2", "T", "waiting", 2, scheduledAt=2))],
        "webhook",
        1000,
    )
    assert result.outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert [(c.previous_phase, c.phase) for c in result.changes] == [
        (None, "pending"),
        ("pending", "waiting"),
    ]
    assert result.changes[0].seq < result.changes[1].seq
    stored = await store.get_task("T")
    assert stored is not None and stored.phase == "waiting" and stored.task["scheduledAt"] == 2
    assert result.changes[1].task == stored.task


async def test_duplicates_are_recognised_within_and_across_batches(store: Store) -> None:
    e1 = decode(ev("e1", "T", "pending", 1))
    first = await store.ingest([e1, e1], "webhook", 1)
    assert first.outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    again = await store.ingest([e1], "kafka", 2)
    assert again.outcomes == [Outcome.DUPLICATE] and again.changes == []
    assert len(await store.task_history("T")) == 1
    assert (await store.stats()).events == 1


async def test_ingest_raw_decodes_and_reports_what_it_rejects(store: Store) -> None:
    raws = [
        ev("e1", "T", "pending", 1),
        b"this is not json",
        b'{"hello": "world"}',
        webhook_body("e2", {"id": "T", "status": {"updatedAt": 2}}),  # no phase
        ev("e3", "T", "running", 3),
        ev("e1", "T", "pending", 1),
    ]
    result = await store.ingest_raw(raws, "kafka", 1)
    assert result.outcomes[0] == Outcome.ACCEPTED
    assert [(i, r.reason) for i, r in result.rejected] == [
        (1, "not_json"),
        (2, "not_an_event"),
        (3, "invalid_event"),
    ]
    assert "status.phase" in result.outcomes[3].message  # type: ignore[union-attr]
    assert result.outcomes[4:] == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    assert [(c.previous_phase, c.phase) for c in result.changes] == [
        (None, "pending"),
        ("pending", "running"),
    ]
    assert [h.event_id for h in await store.task_history("T")] == ["e1", "e3"]
    assert (await store.stats()).events == 2


async def test_event_ids_are_deduplicated_within_their_task(store: Store) -> None:
    # Livepeer never reuses an event id across tasks; if a producer did, each task still
    # folds its own event (the history dedups on (task, event id)).
    result = await store.ingest(
        [decode(ev("e1", "A", "pending", 1)), decode(ev("e1", "B", "pending", 1))], "w", 1
    )
    assert result.outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert (await store.get_task("A")) is not None and (await store.get_task("B")) is not None
    again = await store.ingest([decode(ev("e1", "B", "pending", 1))], "w", 2)
    assert again.outcomes == [Outcome.DUPLICATE]


async def test_older_event_is_kept_in_history_but_changes_nothing(store: Store) -> None:
    await store.ingest([decode(ev("new", "T", "completed", 10))], "webhook", 1)
    before = await store.get_task("T")
    result = await store.ingest([decode(ev("old", "T", "running", 5))], "webhook", 2)
    assert result.outcomes == [Outcome.ACCEPTED] and result.changes == []
    after = await store.get_task("T")
    assert after == before
    assert [h.event_id for h in await store.task_history("T")] == ["new", "old"]


async def test_version_bumps_only_on_change(store: Store) -> None:
    await store.ingest(
        [decode(ev("a", "T", "running", 1, status_extra={"progress": 0.25}))], "w", 1
    )
    v1 = (await store.get_task("T")).version  # type: ignore[union-attr]
    await store.ingest([decode(ev("b", "T", "running", 2, status_extra={"progress": 0.5}))], "w", 2)
    v2 = (await store.get_task("T")).version  # type: ignore[union-attr]
    await store.ingest([decode(ev("c", "T", "running", 0, status_extra={"progress": 0.1}))], "w", 3)
    v3 = (await store.get_task("T")).version  # type: ignore[union-attr]
    assert v2 == v1 + 1 and v3 == v2


async def test_non_task_events_are_kept_and_touch_no_task(store: Store) -> None:
    raw = orjson.dumps(
        {"id": "a1", "createdAt": 1, "event": "asset.ready", "payload": {"asset": {}}}
    )
    result = await store.ingest([decode(raw)], "webhook", 1)
    assert result.outcomes == [Outcome.ACCEPTED]
    stats = await store.stats()
    assert (stats.events, stats.tasks) == (1, 0)


async def test_outbox_reads_in_order_and_cursors_persist(store: Store) -> None:
    await store.ingest(
        [decode(ev("e1", "A", "pending", 1)), decode(ev("e2", "B", "pending", 1))], "w", 1
    )
    first = await store.changes_after(0)
    assert [c.task_id for c in first] == ["A", "B"]
    assert [c.task_id for c in await store.changes_after(first[0].seq)] == ["B"]
    assert [c.task_id for c in await store.changes_by_seq([first[1].seq])] == ["B"]
    assert await store.get_cursor("h") is None
    await store.set_cursor("h", first[0].seq)
    assert await store.get_cursor("h") == first[0].seq
    stats = await store.stats()
    assert (stats.changes, stats.last_change_seq) == (2, first[1].seq)
    assert [c.phase for c in await store.task_changes("A")] == ["pending"]


async def test_updates_recorded_only_when_asked(tmp_path: Path) -> None:
    for record_updates in (False, True):
        store = SQLiteStore(tmp_path / f"u{record_updates}.db", record_updates=record_updates)
        await store.open()
        try:
            progress = {"status_extra": {"progress": 0.5}}
            await store.ingest(
                [
                    decode(ev("a", "T", "running", 1)),
                    decode(ev("b", "T", "running", 2, **progress)),
                ],
                "w",
                1,
            )
            kinds = [(c.kind, c.previous_phase, c.phase) for c in await store.changes_after(0)]
            expected: list[tuple[str, str | None, str]] = [("phase", None, "running")]
            if record_updates:
                expected.append(("update", "running", "running"))
            assert kinds == expected
        finally:
            await store.close()


async def test_delivery_records(store: Store) -> None:
    done = Delivery("h", 1, DeliveryStatus.DONE, 1, 10, 10)
    dead = Delivery("h", 2, DeliveryStatus.DEAD, 3, 10, 30, "HTTP 400")
    other = Delivery("g", 2, DeliveryStatus.DEAD, 1, 10, 10, "boom")
    replayed = Delivery("h", 1, DeliveryStatus.DONE, 1, 50, 50, replay=True)
    await store.record_deliveries([done, dead, other, replayed])
    assert await store.deliveries_for("h", [1, 2, 3]) == {1: done, 2: dead}
    assert await store.deliveries_for("h", [1], replay=True) == {1: replayed}
    assert await store.list_deliveries([DeliveryStatus.DEAD]) == [other, dead]
    assert await store.list_deliveries([DeliveryStatus.DEAD], "h") == [dead]
    moved = await store.set_delivery_status(
        DeliveryStatus.DEAD, DeliveryStatus.REDRIVE, handler="h"
    )
    assert moved == 1
    assert (await store.deliveries_for("h", [2]))[2].status is DeliveryStatus.REDRIVE
    dropped = await store.set_delivery_status(DeliveryStatus.DEAD, DeliveryStatus.DROPPED, seqs=[2])
    assert dropped == 1  # g's; h's is no longer dead
    assert await store.list_deliveries([DeliveryStatus.DEAD]) == []
    # Replacing a record (a retry that later succeeded) keeps one row per key.
    await store.record_deliveries([replace(dead, status=DeliveryStatus.DONE)])
    assert (await store.deliveries_for("h", [2]))[2].status is DeliveryStatus.DONE


async def test_list_filters_and_paginates(store: Store) -> None:
    events = []
    for i in range(25):
        phase = "completed" if i % 2 else "running"
        events.append(
            decode(
                webhook_body(
                    f"e{i}",
                    {
                        **snapshot(f"T{i:02d}", phase, 100 + i),
                        "type": "clip" if i % 3 == 0 else "upload",
                    },
                )
            )
        )
    await store.ingest(events, "w", 1)
    seen: list[str] = []
    cursor: Cursor | None = None
    while True:
        page = await store.list_tasks(TaskQuery(phases=("completed",), after=cursor, limit=5))
        seen.extend(t.id for t in page.tasks)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"T{i:02d}" for i in range(25) if i % 2]
    since = await store.list_tasks(TaskQuery(updated_since=120, limit=100))
    assert [t.id for t in since.tasks] == [f"T{i:02d}" for i in range(20, 25)]
    clips = await store.list_tasks(TaskQuery(types=("clip",), limit=100, descending=True))
    assert [t.id for t in clips.tasks] == [f"T{i:02d}" for i in reversed(range(0, 25, 3))]
    desc = await store.list_tasks(TaskQuery(limit=3, descending=True))
    rest = await store.list_tasks(TaskQuery(limit=100, descending=True, after=desc.next_cursor))
    assert [t.id for t in desc.tasks + rest.tasks] == [f"T{i:02d}" for i in reversed(range(25))]


@pytest.mark.parametrize("fixture", ["small", "messy"])
async def test_fixture_batches_fold_to_expected(store: Store, fixture: str) -> None:
    events = [decode(d.body) for d in deliveries(fixture)]
    for start in range(0, len(events), 97):
        await store.ingest(events[start : start + 97], "webhook", start)
    expected = expected_tasks(fixture)
    for task_id, task in expected.items():
        stored = await store.get_task(task_id)
        assert stored is not None and stored.task == task
    assert (await store.stats()).tasks == len(expected)


async def test_sqlite_batch_is_all_or_nothing(tmp_path: pytest.TempPathFactory) -> None:
    store = SQLiteStore(tmp_path / "x.db")  # type: ignore[operator]
    await store.open()
    try:
        good = decode(ev("ok", "T", "pending", 1))
        bad = decode(ev("bad", "U", "pending", 1))
        # A value SQLite cannot bind makes the whole batch fail, and nothing of it lands.
        object.__setattr__(bad, "raw", object())
        with pytest.raises(sqlite3.Error):
            await store.ingest([good, bad], "w", 1)
        assert await store.get_task("T") is None
        assert (await store.stats()).events == 0
        assert (await store.ingest([good], "w", 2)).outcomes == [Outcome.ACCEPTED]
    finally:
        await store.close()


async def test_sqlite_state_survives_reopen(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "x.db"  # type: ignore[operator]
    first = SQLiteStore(path)
    await first.open()
    await first.ingest([decode(ev("e1", "T", "running", 5, scheduledAt=3))], "w", 1)
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        # The per-field keys came back too: an older snapshot still cannot win.
        await second.ingest([decode(ev("e0", "T", "waiting", 4, scheduledAt=1))], "w", 2)
        stored = await second.get_task("T")
        assert stored is not None and stored.phase == "running" and stored.task["scheduledAt"] == 3
    finally:
        await second.close()


async def test_lease_has_one_holder_until_it_expires(store: Store) -> None:
    assert await store.acquire_lease("dispatch", "a", 1000, now_ms=0) == "a"
    assert await store.acquire_lease("dispatch", "b", 1000, now_ms=500) == "a"
    assert await store.acquire_lease("dispatch", "a", 1000, now_ms=900) == "a"  # renewed
    assert await store.acquire_lease("dispatch", "b", 1000, now_ms=1500) == "a"
    assert await store.acquire_lease("dispatch", "b", 1000, now_ms=2000) == "b"  # expired
    # A holder known to be dead can be taken over at once.
    assert await store.acquire_lease("dispatch", "c", 1000, now_ms=2001, take_from="b") == "c"
    assert await store.acquire_lease("other", "b", 1000, now_ms=2001) == "b"


async def test_lease_holders_lists_the_unexpired_leases_of_a_prefix(store: Store) -> None:
    await store.acquire_lease("lane:1", "a", 1000, now_ms=0)
    await store.acquire_lease("lane:2", "b", 5000, now_ms=0)
    await store.acquire_lease("lane_3", "c", 5000, now_ms=0)  # '_' is not a wildcard
    await store.acquire_lease("member:a", "a", 5000, now_ms=0)
    assert await store.lease_holders("lane:", now_ms=500) == {"lane:1": "a", "lane:2": "b"}
    assert await store.lease_holders("lane:", now_ms=2000) == {"lane:2": "b"}  # 1 expired
    await store.release_lease("lane:2", "b")
    assert await store.lease_holders("lane:", now_ms=2000) == {}


@pytest.mark.slow  # spawns (and kills) writer processes
async def test_process_writer_restarts_after_its_child_dies(tmp_path: Path) -> None:
    store = SQLiteProcessStore(tmp_path / "p.db")
    await store.open()
    try:
        assert (await store.ingest([decode(ev("a", "T", "pending", 1))], "w", 1)).outcomes == [
            Outcome.ACCEPTED
        ]
        store.kill_writer()  # the writer dies (OOM killer, operator)
        with pytest.raises(RuntimeError, match="died"):
            await store.ingest([decode(ev("b", "T", "running", 2))], "w", 2)
        # The sender retries: a new writer takes it.
        assert (await store.ingest([decode(ev("b", "T", "running", 2))], "w", 3)).outcomes == [
            Outcome.ACCEPTED
        ]
        stored = await store.get_task("T")
        assert stored is not None and stored.phase == "running"
    finally:
        await store.close()


@pytest.mark.slow  # spawns (and kills) writer processes
async def test_process_writer_answers_queued_batches_in_order(tmp_path: Path) -> None:
    store = SQLiteProcessStore(tmp_path / "q.db")
    await store.open()
    try:
        # Batch i repeats batch i-1's event: a duplicate only if they commit in order.
        batches = [[ev(f"e{i}", "T", "running", i)] for i in range(12)]
        batches = [b + (batches[i - 1] if i else []) for i, b in enumerate(batches)]
        results = await asyncio.gather(
            *(store.ingest_raw(b, "w", i) for i, b in enumerate(batches))
        )
        assert results[0].outcomes == [Outcome.ACCEPTED]
        assert all(r.outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE] for r in results[1:])
        assert [c.event_id for r in results for c in r.changes] == ["e0"]
    finally:
        await store.close()


@pytest.mark.slow  # spawns (and kills) writer processes
async def test_process_writer_death_fails_every_queued_batch_once(tmp_path: Path) -> None:
    store = SQLiteProcessStore(tmp_path / "d.db")
    await store.open()
    try:
        first = store.writer_pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)  # batches queue up behind a stuck writer
        queued = [
            asyncio.create_task(store.ingest_raw([ev(f"x{i}", "U", "pending", i)], "w", i))
            for i in range(3)
        ]
        await asyncio.sleep(0.2)
        os.kill(first, signal.SIGKILL)
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "died" in str(r) for r in results)
        now = store.writer_pid
        assert now is not None and now != first  # one new writer
        os.kill(now, 0)  # alive
        again = await store.ingest_raw([ev("x0", "U", "pending", 0)], "w", 9)
        assert again.outcomes == [Outcome.ACCEPTED]
    finally:
        await store.close()


async def test_sqlite_refuses_an_unversioned_database_it_cannot_migrate(tmp_path: Path) -> None:
    """Version 0 with an events table is version 1 and gets migrated (see
    test_sqlite_migrations.py); one whose tables are not version 1's fails the step, which
    is rolled back, and is refused in one line naming the file and the step."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as con:  # no user_version, and not version 1's events
        con.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE)")
    schema = "SELECT name, sql FROM sqlite_master"
    with sqlite3.connect(path) as con:
        before = con.execute(schema).fetchall()
    store = SQLiteStore(path)
    with pytest.raises(StoreOpenError, match="schema migration 2") as raised:
        await store.open()
    await store.close()
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert "rolled back, the database stays at schema 1" in str(raised.value)
    with sqlite3.connect(path) as con:  # left as it was (in WAL mode now)
        assert con.execute(schema).fetchall() == before
        assert con.execute("PRAGMA user_version").fetchone() == (0,)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "the file is empty"),
        (b"not a database at all, just some text " * 100, "not a SQLite database"),
    ],
)
async def test_sqlite_refuses_an_empty_or_foreign_file(
    tmp_path: Path, content: bytes, says: str
) -> None:
    """A zero-length file (a truncated copy, a failed restore) would otherwise open as an
    empty store, losing the history without a word."""
    path = tmp_path / "phasewatch.db"
    path.write_bytes(content)
    store = SQLiteStore(path)
    with pytest.raises(StoreOpenError, match=says) as raised:
        await store.open()
    assert str(path) in str(raised.value)
    await store.close()
    assert path.read_bytes() == content  # left as it was


async def test_sqlite_creates_a_new_file(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sub" / "new.db")
    await store.open()
    try:
        assert (await store.stats()).events == 0
    finally:
        await store.close()
