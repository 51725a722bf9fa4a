"""The sweeper: alerts once across a restart and across two sweepers on one store (two
SQLite stores on one file; two PostgreSQL stores on one database), imports alert only
with --fire-handlers, and the gauge. Its clock is injected: tests move time, nothing
waits for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from consumer.api.metrics import render
from consumer.cli import replay as cli_replay
from consumer.core.change import ChangeRecord
from consumer.replay.archive import IMPORT_SOURCE, import_archive
from consumer.sources.kafka.window import REPLAY_SOURCE
from consumer.stale import LEASE, StaleSweeper
from consumer.store.base import REPLAYED_SOURCES, Store
from consumer.store.memory import MemoryStore
from consumer.store.postgres.store import PostgresStore
from consumer.store.sqlite.store import SQLiteStore
from tests.pg_fixtures import OutboxGate, lock_waits
from tests.replay.support import opened, parse, settings_for
from tests.stale.support import FIVE_MIN, MINUTE, put
from tests.support import snapshot, wait_until, webhook_body


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def sweeper(store: Store, clock: Clock) -> StaleSweeper:
    return StaleSweeper(store, [("running", FIVE_MIN)], clock=clock)


def alerted(changes: list[ChangeRecord]) -> list[tuple[str, int | float]]:
    return sorted((c.task_id, c.changed_at) for c in changes if c.kind.startswith("stale"))


async def all_alerts(store: Store) -> list[tuple[str, int | float]]:
    return alerted(await store.changes_after(0, 10_000))


async def test_alerted_once_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = Clock(1_000)
    store = SQLiteStore(path)
    await store.open()
    await put(store, "a", "running", 1_000)
    await put(store, "b", "running", 100_000)
    await put(store, "moved", "running", 1_000)
    await put(store, "moved", "completed", 2_000)
    first = sweeper(store, clock)
    assert await first.sweep_once() == []
    clock.now = 1_000 + FIVE_MIN
    assert alerted(await first.sweep_once() or []) == [("a", 1_000)]
    await store.close()  # a crash: the lease is not given back

    clock.now = 100_000 + FIVE_MIN + 20_000  # "b" fell due while the service was down
    store = SQLiteStore(path)
    await store.open()
    try:
        again = sweeper(store, clock)
        assert again.owner != first.owner
        assert alerted(await again.sweep_once() or []) == [("b", 100_000)]
        clock.now += 3_600_000
        assert await again.sweep_once() == []
        assert await all_alerts(store) == [("a", 1_000), ("b", 100_000)]
    finally:
        await store.close()


async def test_a_sweeper_waits_for_the_lease_holder_and_takes_over_when_it_stops() -> None:
    store = MemoryStore()
    clock = Clock(1_000 + FIVE_MIN)
    await put(store, "a", "running", 1_000)
    one, two = sweeper(store, clock), sweeper(store, clock)
    assert alerted(await one.sweep_once() or []) == [("a", 1_000)]
    assert await two.sweep_once() is None and not two.leader  # one holds the lease
    await put(store, "b", "running", 2_000)
    clock.now = 2_000 + FIVE_MIN
    await one.start()  # its loop sweeps at once, then every interval
    await wait_until(lambda: one.rounds, "the first round of the sweeper's loop")
    assert one.alerts == 2 and one.stale_now == {"running": 2}
    await one.stop()  # ... and gives the lease back
    assert await store.lease_holders(LEASE, clock.now) == {}
    assert await two.sweep_once() == [] and two.leader  # "b" was alerted by one
    assert await all_alerts(store) == [("a", 1_000), ("b", 2_000)]


async def _race(stores: list[Store], clock: Clock) -> None:
    """Both sweep at the same instant, bypassing the lease: the store alone keeps once."""
    for i in range(40):
        await put(stores[i % 2], f"t{i:02d}", "running", 1_000 + i)
    await put(stores[0], "t00", "completed", 2_000)
    results = await asyncio.gather(
        *(s.record_stale("running", FIVE_MIN, clock.now, 7) for s in stores for _ in range(3))
    )
    while any(results):  # a round where none found anything: nothing is left
        results = await asyncio.gather(
            *(s.record_stale("running", FIVE_MIN, clock.now, 7) for s in stores)
        )
    assert await all_alerts(stores[0]) == [(f"t{i:02d}", 1_000 + i) for i in range(1, 40)]
    seqs = [c.seq for c in await stores[1].changes_after(0, 10_000)]
    assert seqs == sorted(set(seqs))


async def test_two_sqlite_stores_on_one_file_alert_once(tmp_path: Path) -> None:
    stores: list[Store] = [SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")]
    for s in stores:
        await s.open()
    try:
        await _race(stores, Clock(10**9))
        clock = Clock(10**9)
        # Through the lease as serve runs them: one sweeps, the other waits.
        await put(stores[1], "late", "running", 5_000)
        results = [await sweeper(s, clock).sweep_once() for s in stores]
        assert [alerted(r) if r is not None else None for r in results] == [
            [("late", 5_000)],
            None,
        ]
    finally:
        for s in stores:
            await s.close()


async def test_two_postgres_stores_on_one_database_alert_once(pg_url: str) -> None:
    stores: list[Store] = [PostgresStore(pg_url), PostgresStore(pg_url)]
    for s in stores:
        await s.open()
    try:
        await _race(stores, Clock(10**9))
    finally:
        for s in stores:
            await s.close()


async def test_an_alert_never_lands_behind_a_newer_snapshot_on_postgres(pg_url: str) -> None:
    """The sweeper locks the task as an ingest does and reads the view again: an ingest
    that moved it on first wins, one that comes after follows the alert."""
    store = PostgresStore(pg_url)
    await store.open()
    other = PostgresStore(pg_url)
    await other.open()
    try:
        await put(store, "T", "running", 1_000)
        async with OutboxGate(pg_url) as gate:
            # An ingest moving T on, held before its commit (holding T's row lock).
            moving = asyncio.create_task(put(other, "T", "completed", 2_000))
            await wait_until(lambda: _waits(pg_url, 1), "the ingest held at the gate")
            sweeping = asyncio.create_task(store.record_stale("running", FIVE_MIN, 10**9))
            # The sweeper found T running (the ingest has not committed) and waits on
            # its row lock; once the ingest commits, it reads T again: no longer running.
            await wait_until(lambda: _waits(pg_url, 2), "the sweeper to wait on T's lock")
            await gate.open()
            await moving
            assert await sweeping == []
        assert [c.kind for c in await store.task_changes("T")] == ["phase", "phase"]
    finally:
        await store.close()
        await other.close()


async def _waits(url: str, sessions: int) -> bool:
    """The ingest waits at the gate, and ``sessions - 1`` others on row locks."""
    waits = await lock_waits(url)
    return "advisory" in waits and len(waits) == sessions


def archive(tmp_path: Path, name: str, tasks: dict[str, str]) -> Path:
    path = tmp_path / f"{name}.jsonl"
    lines = [
        orjson.dumps(
            {"signature": "", "body": webhook_body(f"{t}-e", snapshot(t, phase, 1_000)).decode()}
        )
        for t, phase in tasks.items()
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


async def test_an_import_alerts_only_with_fire_handlers(tmp_path: Path) -> None:
    assert set(REPLAYED_SOURCES) == {IMPORT_SOURCE, REPLAY_SOURCE}
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        clock = Clock(10**9)
        quiet = archive(tmp_path, "quiet", {"q1": "running", "q2": "running", "q3": "completed"})
        report = await import_archive(store, quiet)
        assert report.accepted == 3 and await store.changes_after(0) == []
        sweep = sweeper(store, clock)
        assert await sweep.sweep_once() == []
        assert (await sweep.count_once())["running"] == 2  # stuck all the same
        loud = archive(tmp_path, "loud", {"f1": "running", "f2": "completed"})
        await import_archive(store, loud, fire_handlers=True)
        assert alerted(await sweep.sweep_once() or []) == [("f1", 1_000)]
    finally:
        await store.close()


async def test_the_gauge_counts_tasks_stale_now_per_phase() -> None:
    store = MemoryStore()
    clock = Clock(1_000)
    sweep = StaleSweeper(
        store,
        [("running", 15 * MINUTE), ("running", FIVE_MIN), ("waiting", FIVE_MIN)],
        clock=clock,
    )
    await put(store, "a", "running", 1_000)
    await put(store, "b", "running", 200_000)
    await put(store, "w", "waiting", 1_000)
    await put(store, "c", "completed", 1_000)
    assert await sweep.count_once() == {"running": 0, "waiting": 0}
    clock.now = 200_000 + FIVE_MIN  # the shortest threshold of each phase counts
    assert await sweep.count_once() == {"running": 2, "waiting": 1}
    text = render(_status(sweep)).decode()
    assert 'phasewatch_tasks_stale{phase="running"} 2.0' in text
    assert 'phasewatch_tasks_stale{phase="waiting"} 1.0' in text
    assert sweep.status()["watches"] == ["running:300", "running:900", "waiting:300"]


def _status(sweep: StaleSweeper) -> dict[str, object]:
    """The readiness payload's parts /metrics needs, with the sweeper's."""
    ingest = dict.fromkeys(["accepted", "duplicates", "rejected", "batches", "failed"], 0)
    return {
        "events": 0,
        "tasks": 0,
        "changes": 0,
        "pendingChanges": 0,
        "ingest": ingest,
        "dispatch": {"leader": True, "handlers": {}},
        "stale": sweep.status(),
    }


async def test_phasewatch_import_alerts_only_with_fire_handlers(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    quiet = archive(tmp_path, "quiet", {"q1": "running"})
    loud = archive(tmp_path, "loud", {"f1": "running"})
    assert await cli_replay.run(settings_for(db), parse("import", str(quiet))) == 0
    assert (
        await cli_replay.run(settings_for(db), parse("import", str(loud), "--fire-handlers")) == 0
    )
    async with opened(db) as store:
        alerts = await sweeper(store, Clock(10**9)).sweep_once()
        assert alerted(alerts or []) == [("f1", 1_000)]
