"""Replay handlers over a window: exactly the changes of the ordered history, marked as
replays, recorded apart from live deliveries, resumable. On SQLite and on PostgreSQL."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from consumer.core.change import PhaseChange, idempotency_key
from consumer.core.codec import decode
from consumer.dispatch.dispatcher import Dispatcher
from consumer.dispatch.subscription import Subscription
from consumer.replay.handlers import Interrupted, replay_changes, replay_handlers, run_key
from consumer.replay.job import Job
from consumer.store.base import Delivery, DeliveryStatus
from consumer.store.postgres.store import PostgresStore
from tests.support import WatchedSQLiteStore, deliveries, expected_changes, wait_until


class WatchedPostgresStore(PostgresStore):
    """:class:`~tests.support.WatchedSQLiteStore` on PostgreSQL: counts the dispatcher's
    housekeeping passes (each asks once per handler for the deliveries to re-drive), so
    a test can wait for passes to see that something did *not* happen."""

    redrive_reads = 0

    async def list_deliveries(
        self, statuses: Sequence[DeliveryStatus], handler: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        if list(statuses) == [DeliveryStatus.REDRIVE]:
            self.redrive_reads += 1
        return await super().list_deliveries(statuses, handler, limit)

    async def dispatcher_passes(self, passes: int = 2, *, handlers: int = 1) -> None:
        """Return once the dispatcher has made ``passes`` complete passes from now on."""
        target = self.redrive_reads + (passes + 1) * handlers  # as WatchedSQLiteStore's
        await wait_until(
            lambda: self.redrive_reads >= target, f"{passes} more dispatcher passes", timeout=30
        )


Backend = WatchedSQLiteStore | WatchedPostgresStore


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    s: Backend
    if request.param == "postgres":
        # pg_url's way (an async fixture cannot be asked for from this one).
        server = request.getfixturevalue("pg_server")
        server.ensure_running()
        s = WatchedPostgresStore(await server.create_database())
    else:
        s = WatchedSQLiteStore(tmp_path / "h.db")
    await s.open()
    yield s
    await s.close()


async def ingest_small_shuffled(store: Backend) -> None:
    events = [decode(d.body) for d in deliveries("small")]
    random.Random(11).shuffle(events)  # live arrival order differs from the ordered history
    await store.ingest(events, "webhook", 0)


async def test_window_changes_are_those_of_the_ordered_history(store: Backend) -> None:
    await ingest_small_shuffled(store)
    everything = await replay_changes(store, since=0)
    by_task: dict[str, list[list[str | None]]] = {}
    for c in sorted(everything, key=lambda c: (c.task_id, c.changed_at, c.event_id)):
        by_task.setdefault(c.task_id, []).append([c.previous_phase, c.phase])
    assert by_task == expected_changes("small")

    times = sorted(c.changed_at for c in everything)
    since, until = times[len(times) // 3], times[2 * len(times) // 3]
    window = await replay_changes(store, since=since, until=until)
    assert window == [c for c in everything if since <= c.changed_at < until]
    completed = await replay_changes(store, since=0, phases=["completed"])
    assert completed == [c for c in everything if c.phase == "completed"]
    one = everything[0].task_id
    assert await replay_changes(store, since=0, task_id=one) == [
        c for c in everything if c.task_id == one
    ]


async def test_replay_fires_exactly_the_window_and_live_sees_no_duplicates(
    store: Backend,
) -> None:
    live_seen: list[int] = []
    live_keys: dict[tuple[str, str, str], str] = {}

    async def live(change: PhaseChange) -> None:
        live_seen.append(change.seq)
        live_keys[(change.task_id, change.event_id, change.phase)] = change.idempotency_key

    dispatcher = Dispatcher(store, [Subscription(name="notify", fn=live)], poll_s=0.05)
    await dispatcher.start()
    await ingest_small_shuffled(store)
    dispatcher.notify([])
    total_live = (await store.stats()).changes
    await wait_until(lambda: len(live_seen) >= total_live, "every change at the live handler")

    replayed: list[PhaseChange] = []

    async def notify(change: PhaseChange) -> None:
        replayed.append(change)

    window = await replay_changes(store, since=0, phases=["completed"])
    report = await replay_handlers(
        store, [Subscription(name="notify", fn=notify)], window, run_key="t1"
    )
    # The live dispatcher keeps running meanwhile: passes that would find anything left.
    await store.dispatcher_passes(3)
    await dispatcher.stop()
    assert report.delivered == len(window) > 0
    assert [(c.task_id, c.phase) for c in replayed] == [(c.task_id, c.phase) for c in window]
    assert all(c.replay for c in replayed)
    assert sorted(live_seen) == list(range(1, total_live + 1))  # no duplicates, none extra
    replay_records = [
        d for d in await store.list_deliveries([DeliveryStatus.DONE], "notify", 10_000) if d.replay
    ]
    assert len(replay_records) == len(window)
    # A replay is not dropped as a duplicate of the live delivery: another key, the same
    # for every change of one run, built from the run's id and the change.
    assert report.run_id
    # (The ordered history may have changes the live arrival order never produced.)
    both = [c for c in replayed if (c.task_id, c.event_id, c.phase) in live_keys]
    assert both
    for c in both:
        assert c.idempotency_key != live_keys[(c.task_id, c.event_id, c.phase)]
    for c in replayed:
        assert c.idempotency_key == idempotency_key(
            handler="notify",
            task_id=c.task_id,
            event_id=c.event_id,
            kind=c.kind,
            previous_phase=c.previous_phase,
            phase=c.phase,
            replay_run=report.run_id,
        )


async def test_each_replay_run_has_keys_of_its_own(store: Backend) -> None:
    await ingest_small_shuffled(store)
    window = (await replay_changes(store, since=0))[:5]
    keys: dict[str, list[str]] = {"a": [], "b": []}

    async def a(change: PhaseChange) -> None:
        keys["a"].append(change.idempotency_key)

    async def b(change: PhaseChange) -> None:
        keys["b"].append(change.idempotency_key)

    subs = [Subscription(name="a", fn=a), Subscription(name="b", fn=b)]
    first = await replay_handlers(store, subs, window, run_key="same-args")
    first_keys = dict(keys)
    keys = {"a": [], "b": []}
    second = await replay_handlers(store, subs, window, run_key="same-args")
    assert first.run_id != second.run_id
    assert len(first_keys["a"]) == len(keys["a"]) == len(window)
    # Per run and per handler: no key shared by any two deliveries.
    every = [*first_keys["a"], *first_keys["b"], *keys["a"], *keys["b"]]
    assert len(set(every)) == 4 * len(window)


async def test_interrupted_replay_resumes_where_it_was(store: Backend) -> None:
    await ingest_small_shuffled(store)
    window = await replay_changes(store, since=0)
    seen: list[tuple[str, str]] = []
    changes: list[PhaseChange] = []

    async def handler(change: PhaseChange) -> None:
        seen.append((change.task_id, change.event_id))
        changes.append(change)

    sub = Subscription(name="h", fn=handler)
    key = run_key(since=0, handler="h")

    def stop_at_7(changes: int) -> None:
        if len(seen) >= 7:
            raise KeyboardInterrupt  # as Ctrl-C would

    with pytest.raises(Interrupted):
        await replay_handlers(store, [sub], window, run_key=key, job=Job(on_batch=stop_at_7))
    report = await replay_handlers(store, [sub], window, run_key=key)
    assert report.resumed_from == 7
    assert seen == [(c.task_id, c.event_id) for c in window]  # each once, in order
    # The resumed run is the same run: before and after the interruption, every key is
    # made with one run id.
    assert report.run_id
    assert [c.idempotency_key for c in changes] == [
        idempotency_key(
            handler="h",
            task_id=c.task_id,
            event_id=c.event_id,
            kind=c.kind,
            previous_phase=c.previous_phase,
            phase=c.phase,
            replay_run=report.run_id,
        )
        for c in changes
    ]
    again = await replay_handlers(store, [sub], window, run_key=key)
    assert again.resumed_from == 0  # a finished replay starts afresh when asked again
    assert again.run_id != report.run_id
