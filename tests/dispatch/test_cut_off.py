"""What a crash or a lost lease can deliver twice: only the handler calls in flight.

A call that returned keeps its concurrency slot until its 'done' record is committed, so
however slow the store is to write records, at most ``concurrency`` changes per handler
are called and not recorded (before, the slot was given back first and every task with a
change queued could be called while the records waited: the 30-50 changes a SIGKILL
under load delivered again). A holder that cannot renew its lane cuts the lane's calls
off before the lease expires and records nothing for them; the lane's next holder
delivers them again, under the same idempotency key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from consumer.core.change import PhaseChange
from consumer.core.codec import decode
from consumer.dispatch.dispatcher import Dispatcher
from consumer.dispatch.subscription import Subscription
from consumer.store.base import Delivery, DeliveryStatus
from consumer.store.memory import MemoryStore
from tests.support import CrossLoopEvent, WatchedSQLiteStore, snapshot, wait_until, webhook_body


class SlowRecords(WatchedSQLiteStore):
    """Delivery records wait while ``held`` is set: a store busy with other writers."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.open_gate = asyncio.Event()
        self.open_gate.set()

    async def record_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        await self.open_gate.wait()
        await super().record_deliveries(deliveries)


class LeasesDown(MemoryStore):
    """A store whose lease writes fail while ``down``: a holder that cannot renew."""

    down = False

    async def acquire_lease(
        self, name: str, owner: str, ttl_ms: int, now_ms: int, *, take_from: str | None = None
    ) -> str:
        if self.down:
            raise ConnectionError("store unreachable")
        return await super().acquire_lease(name, owner, ttl_ms, now_ms, take_from=take_from)


@pytest.fixture
async def slow(tmp_path: Path) -> AsyncIterator[SlowRecords]:
    s = SlowRecords(tmp_path / "c.db")
    await s.open()
    yield s
    await s.close()


async def ingest_tasks(store: MemoryStore | SlowRecords, tasks: int) -> int:
    events = [decode(webhook_body(f"e{t}", snapshot(f"T{t}", "running", 1))) for t in range(tasks)]
    await store.ingest(events, "test", 0)
    return (await store.stats()).last_change_seq


async def test_calls_not_yet_recorded_never_exceed_the_concurrency(slow: SlowRecords) -> None:
    called: list[int] = []

    async def fast(change: PhaseChange) -> None:
        called.append(change.seq)

    sub = Subscription(name="fast", fn=fast, concurrency=3)
    dispatcher = Dispatcher(slow, [sub], poll_s=0.05)
    await dispatcher.start()
    try:
        slow.open_gate.clear()  # records wait: as if the store were busy
        total = await ingest_tasks(slow, 20)  # 20 tasks, one change each
        dispatcher.notify([])
        await wait_until(lambda: len(called) >= 3, "the first calls")
        await slow.dispatcher_passes(3)  # passes that would start more calls, were it let
        # Three calls returned, none recorded: a crash now would deliver those three again,
        # and only those.
        assert len(called) == 3
        assert dispatcher.status()["handlers"]["fast"]["delivered"] == 0
        slow.open_gate.set()
        await wait_until(lambda: len(called) == total, "every change")
        await wait_until(
            lambda: dispatcher.status()["handlers"]["fast"]["delivered"] == total, "records"
        )
        assert sorted(called) == list(range(1, total + 1))
    finally:
        slow.open_gate.set()
        await dispatcher.stop()


async def test_a_holder_that_cannot_renew_cuts_its_calls_off_and_records_nothing() -> None:
    store = LeasesDown()
    await store.open()
    keys: list[str] = []
    cut_off = CrossLoopEvent()
    second = CrossLoopEvent()

    async def long_call(change: PhaseChange) -> None:
        keys.append(change.idempotency_key)
        if len(keys) == 1:
            try:
                await asyncio.sleep(3600)  # outlives the lease by far
            except asyncio.CancelledError:
                cut_off.set()
                raise
        second.set()

    lease_s = 1.0
    sub = Subscription(name="long", fn=long_call, timeout_s=3600)
    dispatcher = Dispatcher(store, [sub], poll_s=0.05, lease_s=lease_s)
    await dispatcher.start()
    try:
        seq = await ingest_tasks(store, 1)
        dispatcher.notify([])
        await wait_until(lambda: keys, "the call to start")
        began = time.monotonic()
        # A call longer than the lease is fine while the lease is renewed...
        await wait_until(lambda: time.monotonic() - began > 2 * lease_s, "twice the lease")
        assert dispatcher.status()["leader"] and len(keys) == 1 and not cut_off.is_set()
        # ...but once renewals fail, the lane is cut off before its lease could expire.
        store.down = True
        await asyncio.wait_for(cut_off.wait(), lease_s * 3)
        assert not dispatcher.status()["leader"]
        assert await store.deliveries_for("long", [seq]) == {}  # recorded nothing
        # The store comes back: the lane is taken again and the change delivered again,
        # under the same idempotency key.
        store.down = False
        await asyncio.wait_for(second.wait(), 10)
        await wait_until(
            lambda: dispatcher.status()["handlers"]["long"]["delivered"] == 1, "its record"
        )
        assert len(keys) == 2 and keys[0] == keys[1]
        (record,) = (await store.deliveries_for("long", [seq])).values()
        assert record.status is DeliveryStatus.DONE
    finally:
        store.down = False
        await dispatcher.stop()
        await store.close()
