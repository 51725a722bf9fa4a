"""The group-commit ingestor: batches, outcomes per submitter, batches in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from consumer.core.plan import Outcome
from consumer.core.receipt import Receipt
from consumer.sources.group_commit import Ingestor
from consumer.store.base import RawIngestResult, Rejected
from consumer.store.memory import MemoryStore
from tests.support import snapshot, wait_until, webhook_body

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def body(event_id: str, task_id: str, phase: str, t: int) -> bytes:
    return webhook_body(event_id, snapshot(task_id, phase, t))


class GatedStore:
    """The memory store, with each ingest_raw call held until the test opens the gate."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.gate = asyncio.Event()
        self.running = 0
        self.most_running = 0
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def ingest_raw(
        self, raws: Sequence[bytes], source: str, received_at: int, **kw: Any
    ) -> RawIngestResult:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
            self.batches.append(len(raws))
            return await self.inner.ingest_raw(raws, source, received_at, **kw)
        finally:
            self.running -= 1


async def test_each_submitter_gets_its_own_outcome() -> None:
    store = MemoryStore()
    ingestor = Ingestor(store, source="webhook")
    await ingestor.start()
    try:
        results = await asyncio.gather(
            ingestor.submit(body("e1", "T", "pending", 1)),
            ingestor.submit(b"not json"),
            ingestor.submit(body("e2", "T", "running", 2)),
            ingestor.submit(body("e1", "T", "pending", 1)),
        )
    finally:
        await ingestor.stop()
    assert results[0] == Outcome.ACCEPTED
    assert isinstance(results[1], Rejected) and results[1].reason == "not_json"
    assert list(results[2:]) == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    assert (ingestor.stats.accepted, ingestor.stats.duplicates, ingestor.stats.rejected) == (
        2,
        1,
        1,
    )
    stored = await store.get_task("T")
    assert stored is not None and stored.phase == "running"


@pytest.mark.parametrize("max_inflight", [1, 2])
async def test_batches_in_flight_are_bounded_and_group_what_waits(max_inflight: int) -> None:
    store = GatedStore()
    ingestor = Ingestor(store, source="webhook", max_inflight=max_inflight)
    await ingestor.start()
    try:
        first = [
            asyncio.create_task(ingestor.submit(body(f"a{i}", f"T{i}", "pending", 1)))
            for i in range(3)
        ]
        await wait_until(lambda: store.running >= 1, "the first batch at the gate")
        later = [
            asyncio.create_task(ingestor.submit(body(f"b{i}", f"T{i}", "running", 2)))
            for i in range(50)
        ]
        # Held at the gate, as many batches as allowed (most_running, below, shows that
        # never more were running at once).
        await wait_until(lambda: store.running == max_inflight, f"{max_inflight} batches held")
        store.gate.set()
        outcomes = await asyncio.gather(*first, *later)
    finally:
        await ingestor.stop()
    assert store.most_running == max_inflight
    assert outcomes == [Outcome.ACCEPTED] * 53
    # What queued while the store was busy went in as one batch, not 50.
    assert len(store.batches) <= max_inflight + 1
    assert sum(store.batches) == 53


async def test_a_batch_the_store_refuses_is_retried_event_by_event() -> None:
    class Picky(GatedStore):
        async def ingest_raw(
            self, raws: Sequence[bytes], source: str, received_at: int, **kw: Any
        ) -> RawIngestResult:
            if any(b'"poison"' in raw for raw in raws):
                raise RuntimeError("store cannot take this one")
            return await self.inner.ingest_raw(raws, source, received_at, **kw)

    store = Picky()
    ingestor = Ingestor(store, source="webhook")
    await ingestor.start()
    try:
        good = ingestor.submit(body("g1", "T", "pending", 1))
        bad = ingestor.submit(body("poison", "U", "pending", 1))
        results = await asyncio.gather(good, bad, return_exceptions=True)
    finally:
        await ingestor.stop()
    assert results[0] == Outcome.ACCEPTED
    assert isinstance(results[1], RuntimeError)
    assert ingestor.stats.failed == 1
    assert await store.inner.get_task("T") is not None


async def test_receipts_go_with_their_messages_by_position() -> None:
    store = GatedStore()
    ingestor = Ingestor(store, source="webhook")
    await ingestor.start()
    try:
        held = asyncio.create_task(ingestor.submit(body("h", "H", "pending", 1), Receipt("0")))
        await wait_until(lambda: store.running >= 1, "the first batch at the gate")
        # These queue up behind it and go in as one batch, receipts in place.
        queued = [
            asyncio.create_task(ingestor.submit(body("e1", "T", "pending", 1), Receipt("a"))),
            asyncio.create_task(ingestor.submit(b"not json", Receipt("b"))),
            asyncio.create_task(ingestor.submit(body("e2", "T", "running", 2))),
            asyncio.create_task(
                ingestor.submit(body("e3", "U", "pending", 1), Receipt("c", TRACE))
            ),
        ]
        await asyncio.sleep(0.01)
        store.gate.set()
        await asyncio.gather(held, *queued)
    finally:
        await ingestor.stop()
    assert store.batches == [1, 4]
    history = {h.event_id: h.receipt for h in await store.inner.history_after(0)}
    assert history == {"h": Receipt("0"), "e1": Receipt("a"), "e2": None, "e3": Receipt("c", TRACE)}
    changes = await store.inner.changes_after(0)
    assert [(c.event_id, c.traceparent) for c in changes][-1] == ("e3", TRACE)


async def test_receipts_survive_the_one_by_one_retry() -> None:
    seen: list[Any] = []

    class Picky(GatedStore):
        async def ingest_raw(
            self, raws: Sequence[bytes], source: str, received_at: int, **kw: Any
        ) -> RawIngestResult:
            seen.append((len(raws), kw.get("receipts")))
            if len(raws) > 1:
                raise RuntimeError("this store takes one at a time today")
            return await self.inner.ingest_raw(raws, source, received_at, **kw)

    store = Picky()
    store.gate.set()
    ingestor = Ingestor(store, source="webhook")
    await ingestor.start()
    try:
        results = await asyncio.gather(
            ingestor.submit(body("g1", "T", "pending", 1), Receipt("prod", TRACE)),
            ingestor.submit(body("g2", "U", "pending", 1)),
            ingestor.submit(body("g3", "V", "pending", 1), Receipt("1")),
        )
    finally:
        await ingestor.stop()
    assert list(results) == [Outcome.ACCEPTED] * 3
    history = {h.event_id: h.receipt for h in await store.inner.history_after(0)}
    assert history == {"g1": Receipt("prod", TRACE), "g2": None, "g3": Receipt("1")}
    assert any(size > 1 for size, _ in seen)  # a batch failed and was retried one by one
    # A batch with no receipt at all passes none (what a store without them is given).
    assert (1, None) in seen
