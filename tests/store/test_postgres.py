"""What only the PostgreSQL backend has to prove: many writers at once, changes visible
in commit order, migrations under a lock, and clear errors when the server is away.

Everything else it shares with the other backends runs in the one behaviour suite
(``tests/store/test_store.py``, the ``store`` fixture).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from typing import Any

import asyncpg
import orjson
import pytest

from consumer.core.codec import decode
from consumer.core.plan import Outcome
from consumer.core.receipt import Receipt
from consumer.store.base import Delivery, DeliveryStatus, StoreOpenError, TaskQuery
from consumer.store.migrations import Migration
from consumer.store.postgres.migrations import MIGRATIONS
from consumer.store.postgres.store import PostgresStore
from tests.pg_fixtures import OutboxGate, PostgresServer, lock_waits
from tests.support import deliveries, expected_tasks, snapshot, wait_until, webhook_body


def ev(event_id: str, task_id: str, phase: str, t: int) -> bytes:
    return webhook_body(event_id, snapshot(task_id, phase, t))


async def _opened(url: str, **kwargs: object) -> PostgresStore:
    store = PostgresStore(url, pool_size=4, **kwargs)  # type: ignore[arg-type]
    await store.open()
    return store


@pytest.mark.parametrize("fixture", ["small", "messy"])
async def test_concurrent_replicas_on_the_same_tasks_fold_to_the_expected_state(
    pg_url: str, fixture: str
) -> None:
    """Four stores (four replicas' pools) ingest shuffled, overlapping batches of one
    stream at once, every event twice: no lost update, no change recorded twice."""
    replicas = [await _opened(pg_url) for _ in range(4)]
    try:
        events = [decode(d.body) for d in deliveries(fixture)]
        rng = random.Random(7)
        work = events * 2
        rng.shuffle(work)
        batches, start = [], 0
        while start < len(work):
            size = rng.randint(1, 40)
            batches.append(work[start : start + size])
            start += size

        async def replica(store: PostgresStore, mine: list[list[object]]) -> None:
            for batch in mine:
                await store.ingest(batch, "webhook", 1)  # type: ignore[arg-type]

        await asyncio.gather(
            *(replica(s, batches[i::4]) for i, s in enumerate(replicas))  # type: ignore[arg-type]
        )
        reader = replicas[0]
        expected = expected_tasks(fixture)
        for task_id, task in expected.items():
            stored = await reader.get_task(task_id)
            assert stored is not None and stored.task == task
        stats = await reader.stats()
        assert stats.tasks == len(expected)
        assert stats.events == len({(e.task_id, e.id) for e in events})
        changes = await reader.changes_after(0, 100_000)
        assert [c.seq for c in changes] == list(range(1, len(changes) + 1))
        for task_id, task in expected.items():
            mine = [c for c in changes if c.task_id == task_id]
            # One chain per task: each change starts where the previous one ended, and
            # the last ends in the materialized phase. A change recorded twice (two
            # replicas folding against the same old view) would break the chain.
            assert mine[0].previous_phase is None
            for before, after in itertools.pairwise(mine):
                assert after.previous_phase == before.phase != after.phase
            assert mine[-1].phase == task["status"]["phase"]
    finally:
        for store in replicas:
            await store.close()


async def test_a_change_is_never_committed_behind_one_a_reader_has_seen(pg_url: str) -> None:
    """Writer A takes its seqs and is held before its commit (at an outbox gate); writer
    B then ingests another task. With seqs from a sequence B would commit seq 2 while 1
    is still open, a tailing reader would move its cursor to 2, and A's change would be
    skipped for good. Here B waits for A (the allocation is serialized with commit), and
    the reader sees both."""
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        async with OutboxGate(pg_url) as gate:
            first = asyncio.create_task(
                a.ingest([decode(ev("a1", "A", "pending", 1))], "webhook", 1)
            )

            async def waits(expected: list[str]) -> bool:
                return await lock_waits(pg_url) == expected

            await wait_until(lambda: waits(["advisory"]), "A held at the gate", timeout=10)
            second = asyncio.create_task(
                b.ingest([decode(ev("b1", "B", "pending", 1))], "webhook", 1)
            )
            # B waits for A's transaction: the counters row A updated.
            await wait_until(
                lambda: waits(["advisory", "transactionid"]), "B blocked behind A", timeout=10
            )
            seen = [c.seq for c in await b.changes_after(0)]
            assert seen == []  # nothing committed yet: A holds 1, B waits for its turn
            await gate.open()
            await asyncio.gather(first, second)
        cursor, read = 0, list[tuple[int, str]]()
        while batch := await b.changes_after(cursor):
            read.extend((c.seq, c.task_id) for c in batch)
            cursor = batch[-1].seq
        assert read == [(1, "A"), (2, "B")]
    finally:
        await a.close()
        await b.close()


async def test_a_task_moved_between_read_and_write_is_folded_again_under_locks(
    pg_url: str,
) -> None:
    """Replica A reads task T (pending); before A writes, replica B moves T to running.
    A must neither overwrite B's row (a lost update) nor record its change from the phase
    it read: its write finds T at a newer rev, writes nothing, and A folds again under
    the row locks, on top of B's."""
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        await a.ingest([decode(ev("t0", "T", "pending", 1))], "webhook", 1)
        held, release = asyncio.Event(), asyncio.Event()

        async def hold_once() -> None:
            if not held.is_set():
                held.set()
                await release.wait()

        a.after_read = hold_once
        late = asyncio.create_task(a.ingest([decode(ev("t2", "T", "completed", 3))], "webhook", 1))
        await held.wait()
        await b.ingest([decode(ev("t1", "T", "running", 2))], "webhook", 1)
        release.set()
        result = await late
        assert result.outcomes == [Outcome.ACCEPTED]
        assert a.optimistic_conflicts == 1
        moves = [(c.previous_phase, c.phase) for c in await a.task_changes("T")]
        assert moves == [(None, "pending"), ("pending", "running"), ("running", "completed")]
        stored = await a.get_task("T")
        assert stored is not None and stored.task["status"]["phase"] == "completed"
        assert [e.event_id for e in await a.task_history("T")] == ["t0", "t1", "t2"]
    finally:
        await a.close()
        await b.close()


async def test_batches_in_flight_together_that_share_a_task_fold_on_top_of_each_other(
    pg_url: str,
) -> None:
    """One replica's pipeline: its second batch for T is read while the first is still
    being written (held at an outbox gate). It takes T as the first batch leaves it, not
    as the database still has it (absent), so neither write conflicts and the second
    change follows the first."""
    store = await _opened(pg_url)
    try:
        reads: list[int] = []
        second_read = asyncio.Event()

        async def note_read() -> None:
            reads.append(len(reads))
            if len(reads) == 2:
                second_read.set()

        store.after_read = note_read
        async with OutboxGate(pg_url) as gate:
            first = asyncio.create_task(
                store.ingest([decode(ev("t0", "T", "pending", 1))], "webhook", 1)
            )
            await wait_until(
                lambda: _waits_are(pg_url, ["advisory"]), "the first batch held", timeout=10
            )
            second = asyncio.create_task(
                store.ingest([decode(ev("t1", "T", "running", 2))], "webhook", 1)
            )
            await second_read.wait()  # read while the first is uncommitted
            await gate.open()
            await asyncio.gather(first, second)
        assert store.optimistic_conflicts == 0
        moves = [(c.previous_phase, c.phase) for c in await store.task_changes("T")]
        assert moves == [(None, "pending"), ("pending", "running")]
        stored = await store.get_task("T")
        assert stored is not None and stored.version == 2
    finally:
        await store.close()


async def _waits_are(url: str, expected: list[str]) -> bool:
    return await lock_waits(url) == expected


async def test_history_seqs_follow_commit_order_under_concurrent_writers(pg_url: str) -> None:
    """A reader tailing the history while eight writers commit sees every event exactly
    once: its cursor never passes an event that commits later."""
    writers = [await _opened(pg_url) for _ in range(4)]
    reader = writers[0]
    try:
        total = 400
        done = asyncio.Event()

        async def write(n: int, store: PostgresStore) -> None:
            for i in range(n, total, 4):
                await store.ingest(
                    [decode(ev(f"e{i}", f"T{i % 13}", "running", i + 1))], "webhook", 1
                )

        async def tail() -> list[int]:
            cursor, seen = 0, list[int]()
            while True:
                finished = done.is_set()
                batch = await reader.history_after(cursor, 50)
                seen.extend(e.seq for e in batch)
                if batch:
                    cursor = batch[-1].seq
                elif finished:
                    return seen

        tailer = asyncio.create_task(tail())
        await asyncio.gather(*(write(n, s) for n, s in enumerate(writers)))
        done.set()
        seen = await tailer
        assert seen == list(range(1, total + 1))
    finally:
        for store in writers:
            await store.close()


async def test_a_commit_at_one_replica_wakes_the_others(pg_url: str) -> None:
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        woken = asyncio.Event()
        await b.listen_changes(woken.set)
        await wait_until(woken.is_set, "the wake-up that follows LISTEN's (re)connect")
        woken.clear()
        await a.ingest([decode(ev("d1", "D", "pending", 1))], "webhook", 1)  # a change
        await wait_until(woken.is_set, "b woken by a's commit", timeout=10)
    finally:
        await a.close()
        await b.close()


async def test_same_untasked_event_at_two_replicas_is_stored_once(pg_url: str) -> None:
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        body = orjson.dumps(
            {"id": "n1", "createdAt": 1, "event": "asset.ready", "payload": {"asset": {}}}
        )
        results = await asyncio.gather(*(s.ingest_raw([body], "webhook", 1) for s in (a, b, a, b)))
        outcomes = sorted(str(r.outcomes[0]) for r in results)
        assert outcomes.count(str(Outcome.ACCEPTED)) == 1
        assert (await a.stats()).events == 1
    finally:
        await a.close()
        await b.close()


async def test_migrates_an_empty_database_once_under_concurrent_openers(pg_url: str) -> None:
    stores = [PostgresStore(pg_url, pool_size=2) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        applied = [m.version for s in stores for m in s.migrations_applied]
        assert sorted(applied) == [m.version for m in MIGRATIONS]  # each step by one opener
        con = await asyncpg.connect(pg_url)
        try:
            versions = [r[0] for r in await con.fetch("SELECT version FROM schema_version")]
        finally:
            await con.close()
        assert versions == [m.version for m in MIGRATIONS]
    finally:
        for s in stores:
            await s.close()


async def test_migrates_from_the_previous_schema_keeping_the_data(pg_url: str) -> None:
    """A database at the current schema with data, opened by a version with one more
    step, gets that step and keeps what it held."""
    old = await _opened(pg_url)
    await old.ingest([decode(ev("e1", "T", "pending", 1))], "webhook", 1)
    await old.close()
    step = Migration(len(MIGRATIONS) + 1, "a test step", "ALTER TABLE meta ADD COLUMN note text")
    new = await _opened(pg_url, migrations=[*MIGRATIONS, step])
    try:
        assert new.migrations_applied == [step]
        stored = await new.get_task("T")
        assert stored is not None and stored.phase == "pending"
    finally:
        await new.close()
    # The older code now refuses the newer database, in one line.
    with pytest.raises(
        StoreOpenError,
        match=rf"schema {len(MIGRATIONS) + 1}, newer than this version's {len(MIGRATIONS)}",
    ):
        await _opened(pg_url)


# Step 1's tables and their columns: what a database at schema 1 holds.
async def _copied_at_step(pg_server: PostgresServer, step: int) -> tuple[str, str]:
    """A reference database filled by this version (:func:`_fill`), and a database at
    schema ``step`` holding the same rows: every column that schema has, copied from the
    reference. Returns both URLs."""
    reference_url, old_url = await pg_server.create_database(), await pg_server.create_database()
    reference = await _opened(reference_url)
    await _fill(reference)
    await reference.close()
    old = await _opened(old_url, migrations=MIGRATIONS[:step])
    await old.close()
    src, dst = await asyncpg.connect(reference_url), await asyncpg.connect(old_url)
    try:
        await dst.execute("DELETE FROM counters")
        columns: dict[str, list[str]] = {}
        for table, column in await dst.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name <> 'schema_version'"
            " ORDER BY table_name, ordinal_position"
        ):
            columns.setdefault(table, []).append(column)
        for table, names in columns.items():
            rows = await src.fetch(f"SELECT {', '.join(names)} FROM {table}")
            await dst.copy_records_to_table(table, records=rows, columns=names)
    finally:
        await src.close()
        await dst.close()
    return reference_url, old_url


async def _fill(store: PostgresStore) -> None:
    """Rows of every kind: the fixture stream in batches, a non-task event, delivery
    records, a cursor, a meta note and a lease."""
    bodies = [d.body for d in deliveries("small")]
    seqs: list[int] = []
    for i in range(0, len(bodies), 40):
        result = await store.ingest([decode(b) for b in bodies[i : i + 40]], "webhook", 1000 + i)
        seqs += [c.seq for c in result.changes]
    asset = webhook_body("ev-asset", snapshot("A1", "ready", 1), event="asset.ready")
    await store.ingest([decode(asset)], "webhook", 2000)
    await store.record_deliveries(
        [Delivery("notify", s, DeliveryStatus.DONE, 1, 10 + s, 11 + s) for s in seqs[:10]]
        + [Delivery("notify", seqs[10], DeliveryStatus.DEAD, 8, 40, 99, "HTTP 500")]
    )
    await store.set_cursor("notify", seqs[9])
    await store.set_meta("rebuild", '{"upto": 40}')
    await store.acquire_lease("dispatch", "host-1", 10**12, 0)


async def _read_everything(store: PostgresStore) -> dict[str, Any]:
    ids: list[str] = []
    while page := await store.task_ids_after(ids[-1] if ids else None, 25):
        ids += page
    changes = await store.changes_after(0, 100_000)
    return {
        "stats": await store.stats(),
        "ids": ids,
        "tasks": {i: await store.get_task(i) for i in ids},
        "history": {i: await store.task_history(i) for i in ids},
        "history_after": await store.history_after(0, 100_000),
        "history_of_tasks": await store.history_of_tasks(ids, 10**9),
        "changes": changes,
        "task_changes": {i: await store.task_changes(i) for i in ids},
        "deliveries": await store.deliveries_for("notify", [c.seq for c in changes]),
        "cursor": await store.get_cursor("notify"),
        "meta": await store.get_meta("rebuild"),
        "leases": await store.lease_holders("", 0),
        "list": await store.list_tasks(TaskQuery(limit=1000)),
    }


async def test_migrates_a_schema_1_database_to_receipts_keeping_the_data(
    pg_server: PostgresServer,
) -> None:
    """A database at schema 1 full of rows (copied from one this version wrote) gets step
    2: the same rows read back, with no receipts, and new ones keep theirs."""
    reference_url, old_url = await _copied_at_step(pg_server, 1)
    con = await asyncpg.connect(old_url)
    try:
        old_columns = await con.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE column_name IN ('receipt', 'traceparent')"
        )
        assert old_columns == []
    finally:
        await con.close()

    store = await _opened(old_url)
    reference = await _opened(reference_url)
    try:
        assert store.migrations_applied == MIGRATIONS[1:]
        before = await _read_everything(store)
        assert before == await _read_everything(reference)
        assert before["stats"].events == 275 and len(before["ids"]) == 40
        assert any(h.task_id is None for h in before["history_after"])
        assert all(h.receipt is None for h in before["history_after"])
        assert all(c.traceparent is None for c in before["changes"])

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
        assert [c.seq for c in results[0].changes] == [
            before["stats"].last_change_seq + 1,
            before["stats"].last_change_seq + 2,
        ]
        assert [c.traceparent for c in results[0].changes] == [trace, None]
        after = await _read_everything(store)
        assert after == await _read_everything(reference)
        assert [h.receipt for h in after["history_after"][-2:]] == receipts[1:]
        assert after["history"][known][0].receipt is None
    finally:
        await store.close()
        await reference.close()


async def test_migrates_a_schema_3_database_to_optimistic_ingest_keeping_the_data(
    pg_server: PostgresServer,
) -> None:
    """A database at schema 3 full of rows (copied from one this version wrote, receipts
    and all) gets step 4: every row reads back the same, each view row starts at rev 1,
    task ids sort in byte order, and ingesting on top of the migrated rows (updates of
    existing tasks, through the rev check) gives what the reference gets."""
    reference_url, old_url = await _copied_at_step(pg_server, 3)
    con = await asyncpg.connect(old_url)
    try:
        assert (
            await con.fetchval(
                "SELECT count(*) FROM information_schema.columns"
                " WHERE table_name = 'tasks' AND column_name = 'rev'"
            )
            == 0
        )
    finally:
        await con.close()
    store = await _opened(old_url)
    reference = await _opened(reference_url)
    try:
        assert store.migrations_applied == MIGRATIONS[3:]
        before = await _read_everything(store)
        assert before == await _read_everything(reference)
        con = await asyncpg.connect(old_url)
        try:
            assert await con.fetchval("SELECT array_agg(DISTINCT rev) FROM tasks") == [1]
            collation = await con.fetchval(
                "SELECT collation_name FROM information_schema.columns"
                " WHERE table_name = 'task_ids' AND column_name = 'id'"
            )
            assert collation == "C"
        finally:
            await con.close()
        known = before["ids"][:3]
        raws = [before["history"][known[0]][0].raw]  # a duplicate
        raws += [ev(f"late-{i}", t, "failed", 2**52) for i, t in enumerate(known)]
        raws.append(ev("new-1", "brand-new", "pending", 5))
        results = [await s.ingest_raw(raws, "webhook", 9999) for s in (store, reference)]
        assert results[0] == results[1]
        assert results[0].outcomes == [Outcome.DUPLICATE] + [Outcome.ACCEPTED] * 4
        assert store.optimistic_conflicts == 0
        after = await _read_everything(store)
        assert after == await _read_everything(reference)
        assert all(after["tasks"][t].task["status"]["phase"] == "failed" for t in known)
    finally:
        await store.close()
        await reference.close()


async def test_migrate_off_refuses_a_database_that_needs_steps(pg_url: str) -> None:
    with pytest.raises(StoreOpenError, match=r"is at schema 0.*run `phasewatch migrate`"):
        await _opened(pg_url, migrate=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_no_server_is_one_line_without_the_password() -> None:
    url = f"postgresql://phasewatch:s3cret-pw@127.0.0.1:{_closed_port()}/db"
    with pytest.raises(StoreOpenError) as info:
        await _opened(url)
    message = str(info.value)
    assert message.startswith("PHASEWATCH_DATABASE_URL (postgresql://phasewatch@127.0.0.1:")
    assert "cannot connect" in message and "s3cret-pw" not in message
    assert "\n" not in message


async def test_missing_database_is_named(pg_server: PostgresServer) -> None:
    base = pg_server.admin_url.rpartition("/")[0]
    with pytest.raises(StoreOpenError, match=r"does not exist \(create it first\)"):
        await _opened(f"{base}/no_such_database")


@pytest.mark.slow  # stops and restarts the session's server
async def test_writes_fail_while_the_server_is_down_and_resume_after(
    pg_server: PostgresServer, pg_url: str
) -> None:
    if not pg_server.can_restart:
        pytest.fail("this test needs the server the fixtures started (not an external one)")
    store = await _opened(pg_url)
    try:
        await store.ingest([decode(ev("e1", "T", "pending", 1))], "webhook", 1)
        pg_server.stop()
        try:
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await store.ingest([decode(ev("e2", "T", "running", 2))], "webhook", 2)
        finally:
            pg_server.start()

        async def writes_again() -> bool:
            try:
                await store.ingest([decode(ev("e2", "T", "running", 2))], "webhook", 2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return False
            return True

        await wait_until(writes_again, "ingest after the server came back", timeout=30)
        stored = await store.get_task("T")
        assert stored is not None and stored.phase == "running"
        assert [e.event_id for e in await store.task_history("T")] == ["e1", "e2"]
    finally:
        await store.close()


async def test_pooled_statements_are_planned_with_the_statistics_of_the_moment(
    pg_url: str,
) -> None:
    # A generic plan made while the tables were nearly empty scans them whole once they
    # have grown (the dispatcher's reads slowed down second by second under load).
    store = PostgresStore(pg_url)
    await store.open()
    try:
        pool = store._pool
        assert pool is not None
        async with pool.acquire() as con:
            assert await con.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    finally:
        await store.close()
