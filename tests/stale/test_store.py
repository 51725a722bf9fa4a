"""``record_stale`` and ``count_stale`` on every backend (the ``store`` fixture: memory,
SQLite with its writers, PostgreSQL): a task left in a phase is alerted once per
snapshot, tasks that moved on never are, a newer snapshot cancels or restarts the wait,
thresholds are apart, and only tasks reached live (or by a recorded change) are watched.
Time is the ``now_ms`` the tests pass: nothing waits."""

from __future__ import annotations

from consumer.core.change import PhaseChange, stale_kind
from consumer.store.base import Store
from tests.stale.support import FIVE_MIN, MINUTE, put


async def test_a_task_left_running_is_alerted_once_and_one_that_moved_on_never(
    store: Store,
) -> None:
    await put(store, "stuck", "running", 1_000)
    await put(store, "done", "running", 1_000)
    await put(store, "done", "completed", 2_000)
    before = (await store.stats()).last_change_seq

    assert await store.record_stale("running", FIVE_MIN, 1_000 + FIVE_MIN - 1) == []
    alerts = await store.record_stale("running", FIVE_MIN, 1_000 + FIVE_MIN)
    assert [a.task_id for a in alerts] == ["stuck"]
    (alert,) = alerts
    assert alert.kind == stale_kind(FIVE_MIN) == "stale:300000"
    assert (alert.previous_phase, alert.phase, alert.changed_at) == ("running", "running", 1_000)
    assert alert.event_id == "stuck-1000" and alert.recorded_at == 1_000 + FIVE_MIN
    assert alert.seq == before + 1 and alert.task["status"]["phase"] == "running"
    # In the outbox like any change, in commit order.
    assert await store.changes_after(before) == alerts
    assert (await store.task_changes("stuck"))[-1] == alert
    assert (await store.stats()).last_change_seq == alert.seq

    # Once: later sweeps find nothing more, however late.
    for now in (1_000 + FIVE_MIN, 1_000 + FIVE_MIN + 1, 10**12):
        assert await store.record_stale("running", FIVE_MIN, now) == []
    assert [c.kind for c in await store.task_changes("done")] == ["phase", "phase"]

    change = PhaseChange.from_record(alert, handler="h")
    assert change.kind == "stale" and change.phase == "running" and change.changed_at == 1_000


async def test_a_later_snapshot_cancels_the_wait_or_starts_a_new_one(store: Store) -> None:
    await put(store, "T", "running", 1_000)
    await put(store, "T", "running", 200_000)  # still running, reported later: wait again
    assert await store.record_stale("running", FIVE_MIN, 1_000 + FIVE_MIN) == []
    first = await store.record_stale("running", FIVE_MIN, 200_000 + FIVE_MIN)
    assert [(a.task_id, a.changed_at, a.event_id) for a in first] == [("T", 200_000, "T-200000")]

    await put(store, "T", "running", 600_000)  # after the alert: a new wait, a new alert
    assert await store.record_stale("running", FIVE_MIN, 600_000 + FIVE_MIN - 1) == []
    second = await store.record_stale("running", FIVE_MIN, 600_000 + FIVE_MIN)
    assert [(a.task_id, a.changed_at) for a in second] == [("T", 600_000)]
    assert second[0].seq > first[0].seq

    await put(store, "T", "completed", 700_000)  # moved on: nothing more, ever
    await put(store, "U", "running", 1_000)
    await put(store, "U", "failed", 2_000)
    assert await store.record_stale("running", FIVE_MIN, 10**12) == []
    kinds = [(c.kind, c.phase) for c in await store.task_changes("T")]
    assert kinds == [
        ("phase", "running"),
        ("stale:300000", "running"),
        ("stale:300000", "running"),
        ("phase", "completed"),
    ]


async def test_each_threshold_and_phase_alerts_apart_oldest_first(store: Store) -> None:
    for i, task_id in enumerate(["c", "a", "b"]):
        await put(store, task_id, "running", 1_000 + i)
    await put(store, "w", "waiting", 1_000)
    now = 1_000 + 15 * MINUTE
    short = await store.record_stale("running", FIVE_MIN, now, limit=2)
    assert [a.task_id for a in short] == ["c", "a"]  # oldest updatedAt first, at most limit
    assert [a.task_id for a in await store.record_stale("running", FIVE_MIN, now)] == ["b"]
    long = await store.record_stale("running", 15 * MINUTE, now)
    assert [(a.task_id, a.kind) for a in long] == [("c", "stale:900000")]  # a, b: 1-2 ms to go
    assert [a.task_id for a in await store.record_stale("waiting", FIVE_MIN, now)] == ["w"]
    assert await store.record_stale("pending", FIVE_MIN, now) == []


async def test_count_stale_counts_the_tasks_past_the_threshold(store: Store) -> None:
    await put(store, "a", "running", 1_000)
    await put(store, "b", "running", 100_000)
    await put(store, "c", "completed", 1_000)
    await put(store, "old", "running", 1_000, source="import", record_changes=False)
    assert await store.count_stale("running", FIVE_MIN, 1_000 + FIVE_MIN - 1) == 0
    # Alerted or not, watched or not: how many are stuck now.
    assert await store.count_stale("running", FIVE_MIN, 1_000 + FIVE_MIN) == 2
    await store.record_stale("running", FIVE_MIN, 1_000 + FIVE_MIN)
    assert await store.count_stale("running", FIVE_MIN, 100_000 + FIVE_MIN) == 3
    assert await store.count_stale("completed", FIVE_MIN, 10**12) == 1


async def test_imports_and_replays_without_fire_handlers_are_not_watched(store: Store) -> None:
    # What `phasewatch import` and `replay kafka` fold without --fire-handlers.
    await put(store, "imported", "running", 1_000, source="import", record_changes=False)
    await put(store, "replayed", "running", 1_000, source="kafka-replay", record_changes=False)
    # With --fire-handlers their phase changes are recorded: watched.
    await put(store, "fired", "running", 1_000, source="import")
    assert [a.task_id for a in await store.record_stale("running", FIVE_MIN, 10**9)] == ["fired"]

    # An imported task that goes on running live is watched from its live snapshot on.
    await put(store, "imported", "running", 5_000, source="webhook")
    alerts = await store.record_stale("running", FIVE_MIN, 10**9)
    assert [(a.task_id, a.changed_at) for a in alerts] == [("imported", 5_000)]
    # An older live snapshot folded after an import's newer one does not make it live.
    await put(store, "replayed", "running", 500, source="kafka")
    assert await store.record_stale("running", FIVE_MIN, 10**9) == []


async def test_a_task_imported_in_another_phase_is_not_watched_in_it(store: Store) -> None:
    # Reached "running" live, then an import (no changes recorded) brings it to
    # "waiting" again at a later updatedAt: that phase was not reached live.
    await put(store, "T", "running", 1_000)
    await put(store, "T", "waiting", 2_000, source="import", record_changes=False)
    assert await store.record_stale("waiting", FIVE_MIN, 10**9) == []
    assert await store.record_stale("running", FIVE_MIN, 10**9) == []


async def test_changes_after_an_alert_follow_it(store: Store) -> None:
    await put(store, "T", "running", 1_000)
    (alert,) = await store.record_stale("running", FIVE_MIN, 1_000 + FIVE_MIN)
    await put(store, "T", "completed", 1_000 + FIVE_MIN + 1)
    changes = await store.task_changes("T")
    assert [c.kind for c in changes] == ["phase", "stale:300000", "phase"]
    assert changes[1] == alert and changes[2].seq == alert.seq + 1
