"""Handler lifecycle in the dispatcher: every handler's ``on_start`` runs at start and its
``on_stop`` at stop, on a process that delivers (holds dispatch lanes) and on a standby
(holds none) alike; a failing hook is logged and neither stops the service nor the other
handlers' hooks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from consumer.core.change import PhaseChange
from consumer.core.codec import decode
from consumer.dispatch.dispatcher import Dispatcher
from consumer.dispatch.lanes import cursor_name
from consumer.dispatch.subscription import Subscription
from consumer.store.memory import MemoryStore
from tests.support import CrossLoopEvent, snapshot, webhook_body

NAMES = ("alpha", "beta", "gamma")
# Generous: only reached when the behaviour is broken, then the test fails.
TIMEOUT_S = 15.0


class Recorder:
    """Hooks and a handler for several subscriptions, remembering what ran."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.delivered = {name: CrossLoopEvent() for name in NAMES}

    def hook(self, into: list[str], name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            into.append(name)

        return run

    def subscription(self, name: str) -> Subscription:
        async def handler(change: PhaseChange) -> None:
            del change
            self.delivered[name].set()

        return Subscription(
            name=name,
            fn=handler,
            on_start=self.hook(self.started, name),
            on_stop=self.hook(self.stopped, name),
        )

    def subscriptions(self) -> list[Subscription]:
        return [self.subscription(name) for name in NAMES]

    async def all_delivered(self) -> None:
        for event in self.delivered.values():
            await asyncio.wait_for(event.wait(), TIMEOUT_S)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


async def ingest_one(store: MemoryStore, dispatcher: Dispatcher) -> int:
    """One phase change in the outbox; returns its seq."""
    event = decode(webhook_body("e1", snapshot("T1", "running", 1000)))
    await store.ingest([event], "test", 0)
    dispatcher.notify([])
    return (await store.stats()).last_change_seq


async def leader(store: MemoryStore, recorder: Recorder) -> Dispatcher:
    """A dispatcher proven to hold the lanes: it delivered a change to every handler.
    Its lease (3 s) has it save its cursors every second."""
    dispatcher = Dispatcher(store, recorder.subscriptions(), poll_s=0.05, lease_s=3.0)
    await dispatcher.start()
    await ingest_one(store, dispatcher)
    await recorder.all_delivered()
    assert dispatcher.status()["leader"] is True
    return dispatcher


async def test_leader_starts_and_stops_every_handler(store: MemoryStore) -> None:
    recorder = Recorder()
    dispatcher = await leader(store, recorder)
    assert sorted(recorder.started) == sorted(NAMES)
    assert recorder.stopped == []
    await dispatcher.stop()
    assert sorted(recorder.stopped) == sorted(NAMES)


async def test_standby_starts_and_stops_every_handler(store: MemoryStore) -> None:
    first = await leader(store, Recorder())
    recorder = Recorder()
    # Long poll: the standby makes one pass at start, finds every lane taken, then waits.
    standby = Dispatcher(store, recorder.subscriptions(), poll_s=60)
    await standby.start()
    try:
        assert standby.status()["leader"] is False
        assert sorted(recorder.started) == sorted(NAMES)
        await standby.stop()
        assert sorted(recorder.stopped) == sorted(NAMES)
        assert not any(event.is_set() for event in recorder.delivered.values())
    finally:
        await first.stop()


async def test_standby_stop_leaves_the_leaders_cursors(store: MemoryStore) -> None:
    first = await leader(store, Recorder())
    last = (await store.stats()).last_change_seq

    async def cursors() -> list[int | None]:
        # Every lane's, of every handler (16 lanes by default).
        return [
            await store.get_cursor(cursor_name(name, lane, 16))
            for name in NAMES
            for lane in range(16)
        ]

    async def saved() -> None:
        while await cursors() != [last] * len(NAMES) * 16:
            await asyncio.sleep(0.01)

    # The leader saves its cursors on a housekeeping pass.
    await asyncio.wait_for(saved(), TIMEOUT_S)
    standby = Dispatcher(store, Recorder().subscriptions(), poll_s=60)
    await standby.start()
    await standby.stop()
    try:
        assert await cursors() == [last] * len(NAMES) * 16
    finally:
        await first.stop()


async def test_failing_hooks_are_logged_and_the_rest_go_on(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()

    async def broken() -> None:
        raise ConnectionError("broker down")

    subs = [
        Subscription(name=s.name, fn=s.fn, on_start=broken, on_stop=broken)
        if s.name == "alpha"
        else s
        for s in recorder.subscriptions()
    ]
    dispatcher = Dispatcher(store, subs, poll_s=0.05)
    await dispatcher.start()
    assert sorted(recorder.started) == ["beta", "gamma"]
    await ingest_one(store, dispatcher)
    # The handler whose on_start failed is still delivered to, like the others.
    await recorder.all_delivered()
    await dispatcher.stop()
    assert sorted(recorder.stopped) == ["beta", "gamma"]
    messages = [r.getMessage() for r in caplog.records]
    assert "handler alpha failed to start" in messages
    assert "handler alpha failed to stop cleanly" in messages
