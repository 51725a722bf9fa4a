"""The dispatcher, in-process on a real SQLite store: order per task, retries, dead
letters and re-drive, isolation of slow handlers, restarts, filters, bounded backlog."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from consumer.core.change import PhaseChange
from consumer.core.codec import decode
from consumer.core.fold import order_key
from consumer.dispatch.dispatcher import Dispatcher
from consumer.dispatch.subscription import PermanentError, Subscription
from consumer.store.base import DeliveryStatus, Store
from consumer.store.sqlite.store import SQLiteStore
from tests.support import (
    CrossLoopEvent,
    WatchedSQLiteStore,
    deliveries,
    expected_changes,
    snapshot,
    wait_until,
    webhook_body,
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[WatchedSQLiteStore]:
    s = WatchedSQLiteStore(tmp_path / "d.db")
    await s.open()
    yield s
    await s.close()


async def settled(store: Store, dispatcher: Dispatcher) -> None:
    """Wait until every handler has resolved (delivered or filtered out) every change
    in the outbox: nothing more can reach any of them."""

    async def resolved() -> dict[str, Any] | None:
        last = (await store.stats()).last_change_seq
        handlers: dict[str, Any] = dispatcher.status()["handlers"]
        done = all(h["cursor"] == last and h["queued"] == 0 for h in handlers.values())
        return handlers if done else None

    await wait_until(resolved, "every handler to resolve the whole outbox")


async def ingest_lifecycles(store: Store, tasks: int, steps: int = 4) -> int:
    """tasks x (pending, waiting, running, completed), interleaved; returns changes."""
    phases = ["pending", "waiting", "running", "completed"][:steps]
    events = [
        decode(webhook_body(f"e{t}-{i}", snapshot(f"T{t:03d}", phase, 1000 + i)))
        for i, phase in enumerate(phases)
        for t in range(tasks)
    ]
    for start in range(0, len(events), 50):
        await store.ingest(events[start : start + 50], "test", 0)
    return len(events)


async def running(store: Store, *subs: Subscription, **kw: Any) -> Dispatcher:
    dispatcher = Dispatcher(store, subs, poll_s=0.05, **kw)
    await dispatcher.start()
    return dispatcher


async def test_in_order_per_task_concurrent_across_tasks(store: SQLiteStore) -> None:
    seen: list[tuple[str, int]] = []
    active = 0
    peak = 0

    async def handler(change: PhaseChange) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(random.uniform(0, 0.01))
        seen.append((change.task_id, change.seq))
        active -= 1

    dispatcher = await running(store, Subscription(name="h", fn=handler, concurrency=4))
    total = await ingest_lifecycles(store, tasks=30)
    dispatcher.notify([])
    await wait_until(lambda: len(seen) == total, "every change delivered")
    await dispatcher.stop()
    by_task: dict[str, list[int]] = {}
    for task_id, seq in seen:
        by_task.setdefault(task_id, []).append(seq)
    assert all(seqs == sorted(seqs) for seqs in by_task.values())
    assert len({seq for _, seq in seen}) == total  # each change exactly once
    assert 1 < peak <= 4  # concurrent across tasks, within the limit


async def test_retry_with_backoff_then_success(store: SQLiteStore) -> None:
    attempts: list[int] = []
    keys: list[str] = []
    other_keys: list[str] = []

    async def flaky(change: PhaseChange) -> None:
        attempts.append(change.attempt)
        keys.append(change.idempotency_key)
        if len(attempts) < 3:
            raise ConnectionError("receiver down")

    async def other(change: PhaseChange) -> None:
        other_keys.append(change.idempotency_key)

    sub = Subscription(name="flaky", fn=flaky, backoff_s=0.05, max_attempts=5)
    dispatcher = await running(store, sub, Subscription(name="other", fn=other))
    await ingest_lifecycles(store, tasks=1, steps=1)
    dispatcher.notify([])
    await wait_until(
        lambda: dispatcher.status()["handlers"]["flaky"]["delivered"] == 1, "the third attempt"
    )
    await wait_until(lambda: len(other_keys) == 1, "the change at the other handler")
    await dispatcher.stop()
    assert attempts == [1, 2, 3]
    record = (await store.deliveries_for("flaky", [1]))[1]
    assert (record.status, record.attempts) == (DeliveryStatus.DONE, 3)
    # Every attempt carries the change's key for this handler; another handler's differs.
    [stored] = await store.changes_by_seq([1])
    expected = PhaseChange.from_record(stored, handler="flaky").idempotency_key
    assert keys == [expected] * 3
    assert other_keys == [PhaseChange.from_record(stored, handler="other").idempotency_key]
    assert other_keys[0] != expected


async def test_dead_letters_listed_redriven_and_dropped(store: SQLiteStore) -> None:
    healthy = False
    calls: list[tuple[int, int]] = []

    async def receiver(change: PhaseChange) -> None:
        calls.append((change.seq, change.attempt))
        if change.task_id == "T000":
            raise PermanentError("HTTP 400: bad target")
        if not healthy:
            raise TimeoutError

    sub = Subscription(name="n", fn=receiver, backoff_s=0.01, max_attempts=3)
    dispatcher = await running(store, sub)
    await ingest_lifecycles(store, tasks=2, steps=1)
    dispatcher.notify([])
    await wait_until(lambda: dispatcher.status()["handlers"]["n"]["dead"] == 2, "two dead letters")
    dead = await store.list_deliveries([DeliveryStatus.DEAD], "n")
    assert [(d.seq, d.attempts) for d in dead] == [(1, 1), (2, 3)]  # permanent: no retry
    assert dead[0].error == "PermanentError: HTTP 400: bad target"
    assert dead[1].error == "TimeoutError: timed out"
    # The operator fixes the receiver and re-drives; the other one is dropped.
    healthy = True
    assert (
        await store.set_delivery_status(
            DeliveryStatus.DEAD, DeliveryStatus.REDRIVE, handler="n", seqs=[2]
        )
        == 1
    )
    await store.set_delivery_status(DeliveryStatus.DEAD, DeliveryStatus.DROPPED, seqs=[1])
    await wait_until(
        lambda: dispatcher.status()["handlers"]["n"]["delivered"] == 1, "the re-driven delivery"
    )
    await dispatcher.stop()
    assert calls[-1] == (2, 1)  # a re-drive starts counting attempts again
    statuses = {s: d.status for s, d in (await store.deliveries_for("n", [1, 2])).items()}
    assert statuses == {1: DeliveryStatus.DROPPED, 2: DeliveryStatus.DONE}


async def test_hung_handler_does_not_hold_up_others(store: SQLiteStore) -> None:
    fast: list[int] = []
    cut_off: list[int] = []

    async def hung(change: PhaseChange) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cut_off.append(change.seq)
            raise

    async def quick(change: PhaseChange) -> None:
        fast.append(change.seq)

    dispatcher = await running(
        store,
        Subscription(name="hung", fn=hung, timeout_s=3600, concurrency=2),
        Subscription(name="quick", fn=quick),
        drain_s=0.2,
    )
    total = await ingest_lifecycles(store, tasks=10)
    dispatcher.notify([])
    # Everything reaches the quick handler while the hung one holds both of its slots
    # (and could for an hour: its timeout is far beyond this test's deadline).
    await wait_until(lambda: len(fast) == total, "every change at the quick handler")
    hung_status = dispatcher.status()["handlers"]["hung"]
    assert (hung_status["inFlight"], hung_status["delivered"]) == (2, 0)
    # Stopping drains for drain_s, then cuts the hung calls off, recording nothing.
    await asyncio.wait_for(dispatcher.stop(), 30)
    assert len(cut_off) == 2
    records = await store.deliveries_for("hung", list(range(1, total + 1)))
    assert not [d for d in records.values() if d.status is DeliveryStatus.DONE]


async def test_restart_never_repeats_a_recorded_delivery(store: SQLiteStore) -> None:
    delivered: list[int] = []
    gate = CrossLoopEvent()

    async def slow(change: PhaseChange) -> None:
        if len(delivered) >= 20:
            await gate.wait()  # the rest hang until the 'crash'
        delivered.append(change.seq)

    sub = Subscription(name="s", fn=slow, concurrency=1)
    first = await running(store, sub, drain_s=0.1)
    total = await ingest_lifecycles(store, tasks=10)
    first.notify([])
    await wait_until(lambda: len(delivered) >= 20, "20 deliveries before the 'crash'")
    await first.stop()  # cuts the hung call: no record for it
    before = set(delivered)
    done = {
        seq
        for seq, d in (await store.deliveries_for("s", list(range(1, total + 1)))).items()
        if d.status is DeliveryStatus.DONE
    }
    assert done == before
    gate.set()
    second = await running(store, sub)
    await wait_until(lambda: len(delivered) == total, "the rest after the restart")
    await second.stop()
    assert sorted(delivered) == list(range(1, total + 1))  # each once, none lost


async def test_filters_on_the_small_fixture(store: SQLiteStore) -> None:
    got: dict[str, list[tuple[str, str | None, str]]] = {}

    def recorder(name: str) -> Callable[[PhaseChange], Awaitable[None]]:
        async def record(change: PhaseChange) -> None:
            got.setdefault(name, []).append((change.task_id, change.previous_phase, change.phase))

        return record

    subs = [
        Subscription(name="completed", fn=recorder("completed"), phases=frozenset({"completed"})),
        Subscription(
            name="retried",
            fn=recorder("retried"),
            previous=frozenset({"running"}),
            phases=frozenset({"waiting"}),
        ),
        Subscription(name="first", fn=recorder("first"), previous=frozenset({None})),
        Subscription(name="clips", fn=recorder("clips"), types=frozenset({"clip"})),
        Subscription(
            name="where",
            fn=recorder("where"),
            where=lambda c: c.phase == "failed" and c.task.status.error_message is not None,
        ),
    ]
    dispatcher = await running(store, *subs)
    events = sorted((decode(d.body) for d in deliveries("small")), key=order_key)
    await store.ingest(events, "test", 0)
    types = {e.task_id: e.snapshot["type"] for e in events if e.snapshot}
    expected = [
        (task_id, prev, phase)
        for task_id, changes in expected_changes("small").items()
        for prev, phase in changes
    ]
    dispatcher.notify([])
    total_wanted = len([c for c in expected if c[2] == "completed"])
    await wait_until(lambda: len(got.get("completed", [])) == total_wanted, "completed changes")
    await settled(store, dispatcher)
    await dispatcher.stop()

    def want(pred: Callable[[tuple[str, str | None, str | None]], bool]) -> list[Any]:
        return sorted((c for c in expected if pred(c)), key=repr)

    assert sorted(got["completed"], key=repr) == want(lambda c: c[2] == "completed")
    retried = want(lambda c: c[1] == "running" and c[2] == "waiting")
    assert sorted(got.get("retried", []), key=repr) == retried
    assert sorted(got["first"], key=repr) == want(lambda c: c[1] is None)
    assert sorted(got["clips"], key=repr) == want(lambda c: types[c[0]] == "clip")
    assert sorted(got.get("where", []), key=repr) == want(lambda c: c[2] == "failed")


async def test_backlog_is_bounded(store: WatchedSQLiteStore) -> None:
    release = CrossLoopEvent()

    async def blocked(change: PhaseChange) -> None:
        await release.wait()

    dispatcher = await running(
        store, Subscription(name="b", fn=blocked, concurrency=100), max_backlog=25
    )
    total = await ingest_lifecycles(store, tasks=50)
    dispatcher.notify([])

    def queued() -> int:
        return int(dispatcher.status()["handlers"]["b"]["queued"])

    await wait_until(lambda: queued() == 25, "a full backlog")
    await store.dispatcher_passes(3)  # passes that would read more, were there room
    assert queued() == 25
    assert dispatcher.pending((await store.stats()).last_change_seq) == total
    release.set()
    await wait_until(
        lambda: dispatcher.status()["handlers"]["b"]["delivered"] == total, "every delivery"
    )
    await dispatcher.stop()


async def test_new_handler_starts_from_now(store: SQLiteStore) -> None:
    await ingest_lifecycles(store, tasks=3)
    seen: list[int] = []

    async def late(change: PhaseChange) -> None:
        seen.append(change.seq)

    history = (await store.stats()).last_change_seq
    dispatcher = await running(store, Subscription(name="late", fn=late))
    # History is for `replay handlers`, not a surprise at start: the new handler's
    # cursors (one per lane) start past it.
    assert dispatcher.status()["handlers"]["late"]["cursor"] == history
    await store.ingest([decode(webhook_body("new", snapshot("N", "pending", 1)))], "t", 0)
    dispatcher.notify([])
    await settled(store, dispatcher)
    await dispatcher.stop()
    assert seen == [history + 1]


async def test_updates_reach_only_handlers_that_ask(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "u.db", record_updates=True)
    await store.open()
    kinds: dict[str, list[tuple[str, float | None]]] = {"all": [], "phases": []}

    async def every(change: PhaseChange) -> None:
        kinds["all"].append((change.kind, change.task.status.progress))

    async def phases(change: PhaseChange) -> None:
        kinds["phases"].append((change.kind, change.task.status.progress))

    dispatcher = await running(
        store,
        Subscription(name="all", fn=every, updates=True),
        Subscription(name="phases", fn=phases),
    )
    try:
        for i, progress in enumerate([None, 0.25, 0.5]):
            extra = {} if progress is None else {"status_extra": {"progress": progress}}
            await store.ingest(
                [decode(webhook_body(f"p{i}", snapshot("T", "running", 10 + i, **extra)))], "t", 0
            )
        dispatcher.notify([])
        await wait_until(lambda: len(kinds["all"]) == 3, "the three changes")
        await settled(store, dispatcher)
    finally:
        await dispatcher.stop()
        await store.close()
    assert kinds["all"] == [("phase", None), ("update", 0.25), ("update", 0.5)]
    assert kinds["phases"] == [("phase", None)]


async def test_handler_errors_are_kept_without_credentials(store: SQLiteStore) -> None:
    async def leaky(change: PhaseChange) -> None:
        raise PermanentError("POST https://user:hunter2@hooks.example/x failed")

    dispatcher = await running(store, Subscription(name="leaky", fn=leaky))
    await ingest_lifecycles(store, tasks=1, steps=1)
    dispatcher.notify([])
    await wait_until(lambda: dispatcher.status()["handlers"]["leaky"]["dead"] == 1, "a dead letter")
    await dispatcher.stop()
    (dead,) = await store.list_deliveries([DeliveryStatus.DEAD], "leaky")
    assert dead.error == "PermanentError: POST https://hooks.example/x failed"
