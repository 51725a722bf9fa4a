"""Delivery shared by replicas, in lanes: two dispatchers on two SQLiteStore objects
opened on one file stand for two ``phasewatch serve`` processes on one store. They share
the lanes, deliver every change once and in order per task, take over a crashed one's
lanes within the lease, hand lanes over at once on a graceful stop, and keep delivering
across a change of the lane count (and from a store of the version before lanes)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.core.change import ChangeRecord, PhaseChange
from consumer.core.codec import decode
from consumer.dispatch.dispatcher import Dispatcher
from consumer.dispatch.lanes import lane_of
from consumer.dispatch.subscription import Subscription
from consumer.store.base import Delivery, DeliveryStatus, Store
from consumer.store.sqlite.store import SQLiteStore
from tests.support import CrossLoopEvent, snapshot, wait_until, webhook_body

PHASES = ("pending", "waiting", "running", "completed")


@dataclass
class Calls:
    """Every handler call of every replica, in the order they were made."""

    log: list[tuple[str, str, int, str]] = field(default_factory=list)  # who, task, seq, key
    lock: threading.Lock = field(default_factory=threading.Lock)

    def subscription(self, who: str, *, name: str = "h", **kw: Any) -> Subscription:
        async def handler(change: PhaseChange) -> None:
            await asyncio.sleep(random.uniform(0, 0.004))
            with self.lock:
                self.log.append((who, change.task_id, change.seq, change.idempotency_key))

        return Subscription(name=name, fn=handler, **kw)

    def seqs(self, who: str | None = None) -> list[int]:
        with self.lock:
            return [seq for w, _, seq, _ in self.log if who is None or w == who]

    def assert_once_in_order(self, total: int) -> None:
        with self.lock:
            log = list(self.log)
        assert sorted(seq for _, _, seq, _ in log) == list(range(1, total + 1))
        by_task: dict[str, list[int]] = {}
        for _, task_id, seq, _ in log:
            by_task.setdefault(task_id, []).append(seq)
        assert all(seqs == sorted(seqs) for seqs in by_task.values())


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, SQLiteStore]]:
    a = SQLiteStore(tmp_path / "shared.db", synchronous="NORMAL")
    await a.open()
    b = SQLiteStore(tmp_path / "shared.db", synchronous="NORMAL")
    await b.open()
    yield a, b
    await b.close()
    await a.close()


async def ingest(store: Store, tasks: int, *replicas: Dispatcher) -> int:
    """``tasks`` new tasks through the four phases, interleaved (waking ``replicas`` as
    the service would); returns the last seq."""
    first = (await store.stats()).tasks
    events = [
        decode(webhook_body(f"e{t}-{i}", snapshot(f"T{t:04d}", phase, 1000 + i)))
        for i, phase in enumerate(PHASES)
        for t in range(first, first + tasks)
    ]
    for start in range(0, len(events), 40):
        await store.ingest(events[start : start + 40], "test", 0)
        for replica in replicas:
            replica.notify([])
    return (await store.stats()).last_change_seq


def held(dispatcher: Dispatcher) -> set[int]:
    return set(dispatcher.status()["lanes"]["held"])


async def started(store: Store, sub: Subscription, **kw: Any) -> Dispatcher:
    kw.setdefault("poll_s", 0.05)
    dispatcher = Dispatcher(store, [sub], **kw)
    await dispatcher.start()
    return dispatcher


async def both_hold_lanes(a: Dispatcher, b: Dispatcher, lanes: int = 16) -> None:
    def shared() -> bool:
        ha, hb = held(a), held(b)
        return bool(ha) and bool(hb) and not ha & hb and ha | hb == set(range(lanes))

    await wait_until(shared, "both replicas to hold lanes, between them all of them")


async def done_seqs(store: Store, handler: str, last: int) -> set[int]:
    records = await store.deliveries_for(handler, list(range(1, last + 1)))
    return {seq for seq, d in records.items() if d.status is DeliveryStatus.DONE}


async def test_two_replicas_share_the_lanes_and_deliver_each_change_once(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    store_a, store_b = stores
    calls = Calls()
    a = await started(store_a, calls.subscription("a", concurrency=4), lease_s=5.0)
    try:
        assert held(a) == set(range(16))  # alone: every lane, as soon as started
        await ingest(store_a, 20, a)
        # B joins while A is delivering: about half of the lanes move to it.
        b = await started(store_b, calls.subscription("b", concurrency=4), lease_s=5.0)
        try:
            await both_hold_lanes(a, b)
            last = await ingest(store_b, 40, a, b)
            await wait_until(lambda: len(calls.seqs()) >= last, "every change delivered")
            await wait_until(
                lambda: all(d.pending(last) == 0 for d in (a, b)), "nothing pending anywhere"
            )
            calls.assert_once_in_order(last)
            assert calls.seqs("a") and calls.seqs("b")
            assert await done_seqs(store_a, "h", last) == set(range(1, last + 1))
            # Figures: each replica shows only its own lanes.
            assert a.status()["leader"] and b.status()["leader"]
            assert a.status()["lanes"]["members"] == 2
        finally:
            await b.stop()
        # B's graceful stop gave its lanes back: A has them all again.
        await wait_until(lambda: held(a) == set(range(16)), "A to hold every lane again")
    finally:
        await a.stop()


async def test_a_crashed_replicas_lanes_are_taken_over_within_the_lease(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    store_a, store_b = stores
    calls = Calls()
    lease_s = 1.0
    a = await started(store_a, calls.subscription("a", concurrency=2), lease_s=lease_s)
    b = await started(store_b, calls.subscription("b", concurrency=2), lease_s=lease_s)
    try:
        await both_hold_lanes(a, b)
        theirs = held(a)
        last = await ingest(store_a, 30, a, b)
        await wait_until(lambda: len(calls.seqs("a")) >= 10, "A delivering")
        await a._crash()  # like SIGKILL: no lease released, nothing more recorded
        crashed_at = time.monotonic()
        called_by_a = set(calls.seqs("a"))
        recorded = await done_seqs(store_b, "h", last)
        assert held(b) != set(range(16))  # A's leases still stand
        await wait_until(
            lambda: held(b) == set(range(16)), "B to take every lane", timeout=lease_s + 2.0
        )
        took = time.monotonic() - crashed_at
        assert took < lease_s + 1.0, f"took {took:.2f}s, the lease is {lease_s}s"
        assert theirs
        await wait_until(lambda: set(calls.seqs()) == set(range(1, last + 1)), "every change")
        await wait_until(lambda: b.pending(last) == 0, "nothing pending at B")
        again = [seq for seq in calls.seqs("b") if seq in called_by_a]
        # Only changes A had called and not recorded come again; none recorded as done.
        assert not set(again) & recorded
        assert len(again) <= 2  # at most A's concurrency
        assert len(calls.seqs("b")) == len(set(calls.seqs("b")))
    finally:
        await b.stop()
        await a.stop()


async def test_a_graceful_stop_hands_the_lanes_over_at_once(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    store_a, store_b = stores
    calls = Calls()
    # A long lease: only a hand-over, never an expiry, can move the lanes in time.
    a = await started(store_a, calls.subscription("a"), lease_s=60.0)
    b = await started(store_b, calls.subscription("b"), lease_s=60.0)
    try:
        await both_hold_lanes(a, b)
        first = await ingest(store_a, 20, a, b)
        await wait_until(lambda: len(calls.seqs()) >= first, "the first changes")
        await a.stop()
        assert not held(a)
        await wait_until(lambda: held(b) == set(range(16)), "B to hold every lane", timeout=5)
        last = await ingest(store_b, 20, b)
        await wait_until(lambda: len(calls.seqs()) >= last, "the rest")
        calls.assert_once_in_order(last)
    finally:
        await b.stop()


async def test_a_change_of_the_lane_count_skips_nothing_and_repeats_nothing(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    store_a, store_b = stores
    calls = Calls()
    gate = CrossLoopEvent()

    def stuck(who: str) -> Subscription:
        # Like Calls.subscription, but the calls for T0003 hang until the gate opens.
        async def handler(change: PhaseChange) -> None:
            if change.task_id == "T0003":
                await gate.wait()
            with calls.lock:
                calls.log.append((who, change.task_id, change.seq, change.idempotency_key))

        return Subscription(name="h", fn=handler, timeout_s=3600)

    four = await started(store_a, stuck("four"), lanes=4, drain_s=0.1)
    last = await ingest(store_a, 10, four)
    await wait_until(lambda: len(calls.seqs()) == last - 4, "all but T0003's changes")
    await four.stop()  # cuts the hung call off: T0003's changes are all unresolved
    gate.set()
    # Restarted with 3 lanes: every new lane resumes at the lowest of the 4 old cursors.
    three = await started(store_a, stuck("three"), lanes=3)
    try:
        last = await ingest(store_a, 10, three)
        await wait_until(lambda: len(calls.seqs()) >= last, "every change")
        calls.assert_once_in_order(last)
        note = orjson.loads(await store_a.get_meta("dispatch:cursors:h") or "{}")
        assert note["lanes"] == 3
        # While a replica with 3 lanes runs, one with 2 starts (a rolling change of the
        # setting): the last started wins; the lanes change hands; nothing is skipped.
        two = await started(store_b, stuck("two"), lanes=2)
        try:
            await ingest(store_b, 30, three, two)
            await wait_until(lambda: held(two) == {0, 1}, "the 2-lane replica to hold both")
            await wait_until(lambda: not held(three), "the 3-lane replica to hold none")
            last = await ingest(store_b, 10, three, two)
            await wait_until(lambda: len(calls.seqs()) >= last, "every change, again")
            calls.assert_once_in_order(last)
            assert calls.seqs("two")
        finally:
            await two.stop()
    finally:
        await three.stop()


async def test_a_store_from_before_lanes_resumes_at_its_single_cursor(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    store, _ = stores
    last = await ingest(store, 5)
    # What the version before lanes left: its one cursor for the handler at 8, and done
    # records past it (delivered between two cursor saves).
    await store.set_cursor("h", 8)
    await store.record_deliveries(
        [Delivery("h", seq, DeliveryStatus.DONE, 1, 0, 0) for seq in (9, 10)]
    )
    calls = Calls()
    dispatcher = await started(store, calls.subscription("new"))
    try:
        await wait_until(lambda: len(calls.seqs()) >= last - 10, "the changes not done")
        await wait_until(lambda: dispatcher.pending(last) == 0, "nothing pending")
        assert sorted(calls.seqs()) == list(range(11, last + 1))
    finally:
        await dispatcher.stop()


class _GatedStore(SQLiteStore):
    """Holds one outbox read, once armed, after it has read: so that a test can act
    while a dispatcher's read is under way."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.armed = False
        self.reading = asyncio.Event()
        self.go_on = asyncio.Event()

    async def changes_after(self, seq: int, limit: int = 500) -> list[ChangeRecord]:
        batch = await super().changes_after(seq, limit)
        if self.armed and batch:
            self.armed = False
            self.reading.set()
            await self.go_on.wait()
        return batch


async def test_a_lane_handed_over_while_the_outbox_is_read_loses_no_change(
    tmp_path: Path,
) -> None:
    # The read covers every lane held when it starts; a lane given back while it is
    # under way skips the read's changes for it, so its cursor must not move past them:
    # the lane's next holder starts from that cursor (a change was lost this way once,
    # in tests/process/test_replicas.py).
    store = _GatedStore(tmp_path / "gated.db")
    await store.open()
    lane = lane_of("T-held", 2)
    other = next(f"T-{i}" for i in range(100) if lane_of(f"T-{i}", 2) == lane)
    started_first = CrossLoopEvent()
    release_first = CrossLoopEvent()
    seen: list[str] = []

    async def handler(change: PhaseChange) -> None:
        seen.append(change.task_id)
        if change.task_id == "T-held":
            started_first.set()
            await release_first.wait()

    dispatcher = await started(store, Subscription(name="h", fn=handler), lanes=2)
    try:
        assert held(dispatcher) == {0, 1}
        await store.ingest([decode(webhook_body("e1", snapshot("T-held", "pending", 1)))], "t", 0)
        dispatcher.notify([])
        await asyncio.wait_for(started_first.wait(), 30)  # a call in flight in the lane
        store.armed = True
        await store.ingest([decode(webhook_body("e2", snapshot(other, "pending", 2)))], "t", 0)
        dispatcher.notify([])
        await asyncio.wait_for(store.reading.wait(), 30)  # the read has the change
        dispatcher._give_back(lane)  # the lane goes while the read is under way
        store.go_on.set()
        release_first.set()  # the call in flight ends; the lane is handed over
        # The dispatcher, alone, takes the lane back from its saved cursor.
        await wait_until(lambda: other in seen, f"the change of {other}, read during the hand-over")
        assert seen.count(other) == 1
    finally:
        release_first.set()
        await dispatcher.stop()
        await store.close()
