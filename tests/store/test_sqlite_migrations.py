"""SQLite schema migrations on real files: a new database, a version-1 database full of
rows (read back the same through the Store API, and still ingesting), an unversioned
one, one newer than the code, ``migrate=False``, and two stores opening one file at once."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from consumer.core.codec import decode
from consumer.core.plan import Outcome
from consumer.core.receipt import Receipt
from consumer.store.base import Delivery, DeliveryStatus, StoreOpenError, TaskQuery
from consumer.store.migrations import check_steps
from consumer.store.sqlite.migrations import MIGRATIONS, statements
from consumer.store.sqlite.process import SQLiteProcessStore
from consumer.store.sqlite.schema import SCHEMA, SCHEMA_VERSION
from consumer.store.sqlite.store import SQLiteStore
from tests.support import deliveries, snapshot, webhook_body

STEP_1, STEP_2, STEP_3, STEP_4 = MIGRATIONS

# Version 1's tables and the columns they had: what a version-1 database holds.
_V1_COLUMNS = {
    "events": "seq, event_id, task_id, kind, format, source, received_at, created_at,"
    " updated_at, raw",
    "tasks": "id, type, phase, updated_at, version, doc, keys",
    "changes": "seq, task_id, event_id, previous_phase, phase, changed_at, recorded_at, task, kind",
    "deliveries": "handler, seq, replay, status, attempts, first_attempt_at, last_attempt_at,"
    " error",
    "tasks_rebuild": "id, type, phase, updated_at, doc, keys",
    "meta": "key, value",
    "cursors": "handler, seq",
    "leases": "name, owner, expires_at",
}


def ev(event_id: str, task_id: str, phase: str, t: int) -> bytes:
    return webhook_body(event_id, snapshot(task_id, phase, t))


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as con:
        (version,) = con.execute("PRAGMA user_version").fetchone()
    return int(version)


def schema_of(path: Path) -> dict[str, Any]:
    """Every table and index: its SQL (as SQLite keeps it), columns and indexes."""
    con = sqlite3.connect(path)
    try:
        out: dict[str, Any] = {}
        for kind, name, table, sql in con.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ):
            entry: dict[str, Any] = {"type": kind, "table": table, "sql": sql}
            if kind == "table":
                entry["columns"] = con.execute(f"PRAGMA table_info({name})").fetchall()
                entry["indexes"] = sorted(
                    (row[1], row[2], row[3], row[4])  # name, unique, origin, partial
                    for row in con.execute(f"PRAGMA index_list({name})")
                )
            else:
                entry["columns"] = con.execute(f"PRAGMA index_xinfo({name})").fetchall()
            out[name] = entry
        return out
    finally:
        con.close()


def run_step_1(path: Path, version: int) -> None:
    """A version-1 database as the unversioned releases wrote it (``version`` 0) or
    marked 1."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        con.executescript(STEP_1.sql)
        con.execute(f"PRAGMA user_version = {version}")
    finally:
        con.close()


async def fill(store: SQLiteStore) -> None:
    """Realistic rows: the shared fixture stream in batches (changes and updates), a
    non-task event, delivery records of every kind, cursors, a meta note and a lease."""
    bodies = [d.body for d in deliveries("small")]
    asset = webhook_body("ev-asset", snapshot("A1", "ready", 1), event="asset.ready")  # no task
    seqs: list[int] = []
    for i in range(0, len(bodies), 40):
        result = await store.ingest(
            [decode(b) for b in bodies[i : i + 40]], "kafka" if i % 80 else "webhook", 1000 + i
        )
        seqs += [c.seq for c in result.changes]
        if i == 80:
            await store.ingest([decode(asset)], "webhook", 1085)
    await store.record_deliveries(
        [Delivery("notify", s, DeliveryStatus.DONE, 1, 10 + s, 11 + s) for s in seqs[:30]]
        + [
            Delivery("notify", seqs[30], DeliveryStatus.DEAD, 8, 40, 99, "HTTP 500"),
            Delivery("notify", seqs[31], DeliveryStatus.FAILING, 2, 41, 50, "timed out"),
            Delivery("log", seqs[0], DeliveryStatus.DONE, 1, 10, 10, None, True),  # replay
            Delivery("log", seqs[1], DeliveryStatus.DROPPED, 3, 10, 12, "bad"),
        ]
    )
    await store.set_cursor("notify", seqs[29])
    await store.set_cursor("log", seqs[1])
    await store.set_meta("rebuild", '{"upto": 40, "after": "b", "tasks": 2}')
    await store.acquire_lease("dispatch", "host-1", 10**12, 0)


async def read_everything(store: SQLiteStore) -> dict[str, Any]:
    """All that the Store API reads back."""
    ids: list[str] = []
    while page := await store.task_ids_after(ids[-1] if ids else None, 25):
        ids += page
    changes = await store.changes_after(0, 100_000)
    seqs = [c.seq for c in changes]
    return {
        "stats": await store.stats(),
        "ids": ids,
        "tasks": {i: await store.get_task(i) for i in ids},
        "history": {i: await store.task_history(i) for i in ids},
        "history_after": await store.history_after(0, 100_000),
        "history_of_tasks": await store.history_of_tasks(ids, 10**9),
        "changes": changes,
        "task_changes": {i: await store.task_changes(i) for i in ids},
        "deliveries": {
            (h, replay): await store.deliveries_for(h, seqs, replay=replay)
            for h in ("notify", "log")
            for replay in (False, True)
        },
        "attention": await store.list_deliveries(list(DeliveryStatus)),
        "cursors": {h: await store.get_cursor(h) for h in ("notify", "log", "never")},
        "meta": await store.get_meta("rebuild"),
        "leases": await store.lease_holders("", 0),
        "list": await store.list_tasks(TaskQuery(limit=1000)),
        "list_completed": await store.list_tasks(TaskQuery(phases=("completed",), limit=1000)),
    }


def down_to_version_1(source: Path, target: Path, version: int) -> None:
    """``target``: a version-1 database (made with step 1's SQL) holding the rows of
    ``source``, as version 1 kept them: no task numbers, the view keyed by task id."""
    run_step_1(target, version)
    con = sqlite3.connect(target, isolation_level=None)
    try:
        con.execute("ATTACH DATABASE ? AS src", (str(source),))
        con.execute("BEGIN")
        for table, columns in _V1_COLUMNS.items():
            con.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM src.{table}")
        con.execute("DELETE FROM main.sqlite_sequence")
        con.execute("INSERT INTO main.sqlite_sequence SELECT * FROM src.sqlite_sequence")
        con.execute("COMMIT")
        con.execute("DETACH DATABASE src")
    finally:
        con.close()


def test_the_steps_are_numbered_and_the_version_is_the_last() -> None:
    check_steps(MIGRATIONS)
    assert SCHEMA_VERSION == len(MIGRATIONS) == 4
    assert all(statements(m.sql) for m in MIGRATIONS)
    assert statements("CREATE TABLE a (b TEXT DEFAULT ';');\n\nINSERT INTO a VALUES (';');") == [
        "CREATE TABLE a (b TEXT DEFAULT ';');",
        "INSERT INTO a VALUES (';');",
    ]


@pytest.mark.parametrize("start", ["no file", "empty database"])
async def test_a_new_database_runs_every_step_and_is_the_latest_schema(
    tmp_path: Path, start: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "new.db"
    if start == "empty database":  # a valid SQLite file without tables
        sqlite3.connect(path).execute("VACUUM").connection.close()
        assert path.stat().st_size > 0
    reference = tmp_path / "reference.db"
    with sqlite3.connect(reference) as con:
        con.executescript(SCHEMA)
    caplog.set_level(logging.INFO, logger="consumer.store.sqlite.store")
    store = SQLiteStore(path)
    await store.open()
    try:
        assert store.migrations_applied == MIGRATIONS
        result = await store.ingest([decode(ev("e1", "T", "pending", 1))], "webhook", 1)
        assert result.outcomes == [Outcome.ACCEPTED] and result.changes[0].seq == 1
    finally:
        await store.close()
    assert user_version(path) == SCHEMA_VERSION
    assert schema_of(path) == schema_of(reference)
    applied = [r for r in caplog.records if "schema migration" in r.getMessage()]
    assert [r.levelno for r in applied] == [logging.INFO] * len(MIGRATIONS)
    assert str(path) in applied[0].getMessage() and STEP_2.name in applied[1].getMessage()

    again = SQLiteStore(path)  # up to date: nothing to do
    await again.open()
    assert again.migrations_applied == []
    await again.close()


@pytest.mark.parametrize("version", [1, 0], ids=["version 1", "unversioned"])
async def test_a_version_1_database_reads_back_the_same_and_keeps_ingesting(
    tmp_path: Path, version: int
) -> None:
    # The reference: the same rows written by this version into a new database.
    reference = SQLiteStore(tmp_path / "reference.db", record_updates=True)
    await reference.open()
    await fill(reference)
    await reference.close()
    old = tmp_path / "old.db"
    down_to_version_1(tmp_path / "reference.db", old, version)
    assert "task_numbers" not in schema_of(old) and "task_no" not in str(schema_of(old))

    store = SQLiteStore(old, record_updates=True)
    await store.open()
    reference = SQLiteStore(tmp_path / "reference.db", record_updates=True)
    await reference.open()
    try:
        assert store.migrations_applied == [STEP_2, STEP_3, STEP_4]
        before = await read_everything(store)
        assert before == await read_everything(reference)
        # Not vacuous: the fixture's tasks, their history, changes and deliveries are there.
        assert before["stats"].events == 275 and len(before["ids"]) == 40
        assert {c.kind for c in before["changes"]} == {"phase", "update"}
        assert any(h.task_id is None for h in before["history_after"])
        assert len(before["deliveries"][("notify", False)]) == 32
        assert before["cursors"] == {"notify": before["changes"][29].seq, "log": 2, "never": None}

        # Ingesting goes on where version 1 left off, as on the reference: duplicates
        # recognised, new seqs past the old ones, a known task's phase moves on.
        known = before["ids"][0]
        phase = before["tasks"][known].phase
        old_body = before["history"][known][0].raw
        batch = [
            decode(old_body),
            decode(ev("late-1", known, "failed" if phase != "failed" else "running", 2**52)),
            decode(ev("new-1", "brand-new", "pending", 5)),
        ]
        results = [await s.ingest(batch, "webhook", 9999) for s in (store, reference)]
        assert results[0] == results[1]
        assert results[0].outcomes == [Outcome.DUPLICATE, Outcome.ACCEPTED, Outcome.ACCEPTED]
        assert [c.seq for c in results[0].changes] == [
            before["stats"].last_change_seq + 1,
            before["stats"].last_change_seq + 2,
        ]
        assert results[0].changes[0].previous_phase == phase
        assert await read_everything(store) == await read_everything(reference)
        assert (await store.stats()).last_event_seq == before["stats"].last_event_seq + 2
    finally:
        await store.close()
        await reference.close()
    assert user_version(old) == SCHEMA_VERSION
    # The migrated file has the latest schema exactly, and numbered its tasks as this
    # version numbers them (in order of first sight).
    assert schema_of(old) == schema_of(tmp_path / "reference.db")
    numbers = "SELECT no, id FROM task_numbers ORDER BY no"
    with sqlite3.connect(old) as a, sqlite3.connect(tmp_path / "reference.db") as b:
        assert a.execute(numbers).fetchall() == b.execute(numbers).fetchall()
        assert a.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# Version 2's tables and their columns: what a version-2 database holds.
_V2_COLUMNS = {
    "events": "seq, event_id, task_no, task_id, kind, format, source, received_at,"
    " created_at, updated_at, raw",
    "task_numbers": "no, id",
    "tasks": "no, id, type, phase, updated_at, version, doc, keys",
    "changes": "seq, task_no, task_id, event_id, previous_phase, phase, changed_at,"
    " recorded_at, task, kind",
    "deliveries": "handler, seq, replay, status, attempts, first_attempt_at, last_attempt_at,"
    " error",
    "tasks_rebuild": "no, id, type, phase, updated_at, doc, keys",
    "meta": "key, value",
    "cursors": "handler, seq",
    "leases": "name, owner, expires_at",
}


def down_to_version_2(source: Path, target: Path) -> None:
    """``target``: a version-2 database (made with steps 1 and 2) holding the rows of
    ``source`` as version 2 kept them: no receipts, no traceparents."""
    con = sqlite3.connect(target, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        con.executescript(STEP_1.sql)
        con.executescript(STEP_2.sql)
        con.execute("PRAGMA user_version = 2")
        con.execute("ATTACH DATABASE ? AS src", (str(source),))
        con.execute("BEGIN")
        for table, columns in _V2_COLUMNS.items():
            con.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM src.{table}")
        con.execute("DELETE FROM main.sqlite_sequence")
        con.execute("INSERT INTO main.sqlite_sequence SELECT * FROM src.sqlite_sequence")
        con.execute("COMMIT")
        con.execute("DETACH DATABASE src")
    finally:
        con.close()


async def test_a_version_2_database_gets_receipts_and_keeps_its_data(tmp_path: Path) -> None:
    reference = SQLiteStore(tmp_path / "reference.db", record_updates=True)
    await reference.open()
    await fill(reference)
    await reference.close()
    old = tmp_path / "v2.db"
    down_to_version_2(tmp_path / "reference.db", old)
    assert "receipt" not in str(schema_of(old)) and "traceparent" not in str(schema_of(old))

    store = SQLiteStore(old, record_updates=True)
    await store.open()
    reference = SQLiteStore(tmp_path / "reference.db", record_updates=True)
    await reference.open()
    try:
        assert store.migrations_applied == [STEP_3, STEP_4]
        before = await read_everything(store)
        assert before == await read_everything(reference)
        assert before["stats"].events == 275 and len(before["ids"]) == 40
        assert all(h.receipt is None for h in before["history_after"])
        assert all(c.traceparent is None for c in before["changes"])

        # New events keep their receipts, next to the old rows.
        trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        known = before["ids"][0]
        raws = [
            before["history"][known][0].raw,  # a duplicate
            ev("late-1", known, "failed", 2**52),
            ev("new-1", "brand-new", "pending", 5),
        ]
        receipts = [Receipt("x"), Receipt("prod", trace), Receipt("1")]
        results = [
            await s.ingest_raw(raws, "webhook", 9999, receipts=receipts) for s in (store, reference)
        ]
        assert results[0] == results[1]
        assert results[0].outcomes == [Outcome.DUPLICATE, Outcome.ACCEPTED, Outcome.ACCEPTED]
        assert [c.traceparent for c in results[0].changes] == [trace, None]
        after = await read_everything(store)
        assert after == await read_everything(reference)
        assert [h.receipt for h in after["history_after"][-2:]] == receipts[1:]
        assert after["history"][known][0].receipt is None  # the old row, as it was
    finally:
        await store.close()
        await reference.close()
    assert user_version(old) == SCHEMA_VERSION
    assert schema_of(old) == schema_of(tmp_path / "reference.db")
    with sqlite3.connect(old) as con:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


async def test_an_unversioned_database_is_version_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "unversioned.db"
    run_step_1(path, 0)
    with sqlite3.connect(path) as con:
        con.execute(
            "INSERT INTO events (event_id, task_id, kind, format, source, received_at,"
            " created_at, updated_at, raw) VALUES ('e1', 'T', 'task.updated', 'webhook',"
            " 'webhook', 7, 1, 1, ?)",
            (ev("e1", "T", "pending", 1),),
        )
    caplog.set_level(logging.INFO, logger="consumer.store.sqlite.store")
    store = SQLiteStore(path)
    await store.open()
    try:
        assert store.migrations_applied == [STEP_2, STEP_3, STEP_4]
        assert [(h.seq, h.event_id) for h in await store.task_history("T")] == [(1, "e1")]
        assert await store.task_ids_after(None) == ["T"]
    finally:
        await store.close()
    logged = [r.getMessage() for r in caplog.records if "schema migration" in r.getMessage()]
    assert len(logged) == 3 and "schema migration 2" in logged[0] and str(path) in logged[0]
    assert "schema migration 3" in logged[1] and "schema migration 4" in logged[2]
    assert user_version(path) == 4


async def test_a_database_newer_than_the_code_is_refused_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    run_step_1(path, 0)
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA user_version = 5")
    content = path.read_bytes()
    store = SQLiteStore(path)
    with pytest.raises(StoreOpenError) as raised:
        await store.open()
    await store.close()
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    assert "schema 5, newer than this version's 4" in message
    assert store.migrations_applied == []
    assert path.read_bytes() == content


async def test_migrate_false_refuses_pending_steps_and_opens_an_up_to_date_file(
    tmp_path: Path,
) -> None:
    old = tmp_path / "old.db"
    run_step_1(old, 0)
    content = old.read_bytes()
    for store in (SQLiteStore(old, migrate=False), SQLiteProcessStore(old, migrate=False)):
        with pytest.raises(StoreOpenError) as raised:
            await store.open()
        await store.close()
        message = str(raised.value)
        assert "\n" not in message and str(old) in message
        assert "schema 1, this version needs 4" in message and "phasewatch migrate" in message
        assert user_version(old) == 0 and old.read_bytes() == content

    missing = tmp_path / "sub" / "missing.db"
    refused = SQLiteStore(missing, migrate=False)
    with pytest.raises(StoreOpenError, match=r"does not exist.*phasewatch migrate") as raised:
        await refused.open()
    await refused.close()
    assert str(missing) in str(raised.value) and not missing.parent.exists()

    migrated = SQLiteStore(old)
    await migrated.open()
    await migrated.close()
    current = SQLiteStore(old, migrate=False)
    await current.open()
    try:
        assert current.migrations_applied == []
        assert (await current.stats()).events == 0
    finally:
        await current.close()


def _open_in_thread(path: Path, barrier: threading.Barrier, out: list[Any]) -> None:
    async def run() -> None:
        store = SQLiteStore(path)
        barrier.wait()
        await store.open()
        try:
            out.append([m.version for m in store.migrations_applied])
            out.append(await store.get_task("T"))
        finally:
            await store.close()

    try:
        asyncio.run(run())
    except BaseException as exc:
        out.append(exc)


def _open_in_process(path: str, ready: Any, go: Any, applied: Any) -> None:
    async def run() -> None:
        store = SQLiteStore(path)
        ready.release()
        go.wait()
        await store.open()
        applied.put([m.version for m in store.migrations_applied])
        await store.close()

    asyncio.run(run())


def _version_1_file(path: Path) -> None:
    run_step_1(path, 0)
    with sqlite3.connect(path) as con:
        con.execute(
            "INSERT INTO events (event_id, task_id, kind, format, source, received_at,"
            " created_at, updated_at, raw) VALUES ('e1', 'T', 'task.updated', 'webhook',"
            " 'webhook', 7, 1, 1, ?)",
            (ev("e1", "T", "pending", 1),),
        )
        con.execute(
            "INSERT INTO tasks VALUES ('T', 'upload', 'pending', 1, 0, ?, x'')",
            (b'{"id":"T","status":{"phase":"pending","updatedAt":1}}',),
        )


def _empty_database(path: Path) -> None:
    """A valid SQLite file without tables: version 0. (Not a path that does not exist
    yet: a store that finds the 0-byte file another one is just creating refuses it.)"""
    sqlite3.connect(path).execute("VACUUM").connection.close()


@pytest.mark.parametrize(
    ("make", "steps"),
    [(_version_1_file, [2, 3, 4]), (_empty_database, [1, 2, 3, 4])],
    ids=["v1", "v0"],
)
def test_two_stores_opening_one_file_at_once_apply_each_step_once(
    tmp_path: Path, make: Any, steps: list[int]
) -> None:
    for round_ in range(3):  # a few rounds: the race does not go the same way every time
        path = tmp_path / f"shared-{round_}.db"
        make(path)
        barrier = threading.Barrier(2)
        outs: list[list[Any]] = [[], []]
        threads = [
            threading.Thread(target=_open_in_thread, args=(path, barrier, out)) for out in outs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for out in outs:
            assert not any(isinstance(o, BaseException) for o in out), out
        assert sorted(v for out in outs for v in out[0]) == steps
        assert user_version(path) == SCHEMA_VERSION
        if make is _version_1_file:
            assert all(out[1] is not None and out[1].phase == "pending" for out in outs)


@pytest.mark.slow  # spawns processes
def test_two_processes_opening_a_version_1_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    _version_1_file(path)
    ctx = mp.get_context("spawn")
    ready, go, applied = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_open_in_process, args=(str(path), ready, go, applied)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert ready.acquire(timeout=60)
    go.set()  # both have imported everything and wait here: they open together
    results = [applied.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    # Each step once, by either opener (one may take step 3 while the other took step 2).
    assert sorted(v for applied_here in results for v in applied_here) == [2, 3, 4]
    assert user_version(path) == SCHEMA_VERSION
