"""One behaviour suite, run against every backend (memory, SQLite with its thread and
process writers, PostgreSQL): what the store Protocols (consumer.store.base) promise.
The SQLite-only tests at the end are about that backend's files and writer process."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from consumer.core.change import PhaseChange
from consumer.core.codec import Event, decode
from consumer.core.fold import TaskState
from consumer.core.plan import Outcome, plan_batch
from consumer.core.receipt import Receipt
from consumer.store.base import (
    Cursor,
    Delivery,
    DeliveryStatus,
    Rejected,
    Store,
    StoredTask,
    StoreOpenError,
    TaskQuery,
)
from consumer.store.sqlite.process import SQLiteProcessStore
from consumer.store.sqlite.store import SQLiteStore
from tests.support import deliveries, expected_tasks, snapshot, webhook_body


def ev(event_id: str, task_id: str, phase: str, t: int, **fields: object) -> bytes:
    return webhook_body(event_id, snapshot(task_id, phase, t, **fields))


async def test_ingest_folds_and_records_changes(store: Store) -> None:
    result = await store.ingest(
        [decode(ev("e1", "T", "pending", 1)), decode(ev("e2", "T", "waiting", 2, scheduledAt=2))],
        "webhook",
        1000,
    )
    assert result.outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert [(c.previous_phase, c.phase) for c in result.changes] == [
        (None, "pending"),
        ("pending", "waiting"),
    ]
    assert result.changes[0].seq < result.changes[1].seq
    stored = await store.get_task("T")
    assert stored is not None and stored.phase == "waiting" and stored.task["scheduledAt"] == 2
    assert result.changes[1].task == stored.task


async def test_duplicates_are_recognised_within_and_across_batches(store: Store) -> None:
    e1 = decode(ev("e1", "T", "pending", 1))
    first = await store.ingest([e1, e1], "webhook", 1)
    assert first.outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    again = await store.ingest([e1], "kafka", 2)
    assert again.outcomes == [Outcome.DUPLICATE] and again.changes == []
    assert len(await store.task_history("T")) == 1
    assert (await store.stats()).events == 1


async def test_ingest_raw_decodes_and_reports_what_it_rejects(store: Store) -> None:
    raws = [
        ev("e1", "T", "pending", 1),
        b"this is not json",
        b'{"hello": "world"}',
        webhook_body("e2", {"id": "T", "status": {"updatedAt": 2}}),  # no phase
        ev("e3", "T", "running", 3),
        ev("e1", "T", "pending", 1),
    ]
    result = await store.ingest_raw(raws, "kafka", 1)
    assert result.outcomes[0] == Outcome.ACCEPTED
    assert [(i, r.reason) for i, r in result.rejected] == [
        (1, "not_json"),
        (2, "not_an_event"),
        (3, "invalid_event"),
    ]
    assert "status.phase" in result.outcomes[3].message  # type: ignore[union-attr]
    assert result.outcomes[4:] == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    assert [(c.previous_phase, c.phase) for c in result.changes] == [
        (None, "pending"),
        ("pending", "running"),
    ]
    assert [h.event_id for h in await store.task_history("T")] == ["e1", "e3"]
    assert (await store.stats()).events == 2


TRACE_A = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_B = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
ASSET = orjson.dumps({"id": "a1", "createdAt": 1, "event": "asset.ready", "payload": {}})


async def test_receipts_are_kept_in_the_history_by_position(store: Store) -> None:
    raws = [
        ev("e1", "T", "pending", 1),
        b"not json",  # rejected: the receipts after it keep their places
        ev("e2", "T", "running", 2),
        ASSET,
        ev("e1", "T", "pending", 1),  # a duplicate: the first copy's receipt stays
        ev("e3", "U", "pending", 1),
        ev("e4", "U", "running", 2),
    ]
    receipts = [
        Receipt("prod", TRACE_A),
        Receipt("0"),
        Receipt("1", TRACE_B),
        Receipt(traceparent=TRACE_A),
        Receipt("other"),
        None,
        Receipt(),  # empty: kept as none
    ]
    result = await store.ingest_raw(raws, "webhook", 7, receipts=receipts)
    assert result.outcomes[0] == Outcome.ACCEPTED and isinstance(result.outcomes[1], Rejected)
    assert (
        result.outcomes[2:] == [Outcome.ACCEPTED] * 2 + [Outcome.DUPLICATE] + [Outcome.ACCEPTED] * 2
    )
    expected = {
        "e1": Receipt("prod", TRACE_A),
        "e2": Receipt("1", TRACE_B),
        "a1": Receipt(traceparent=TRACE_A),
        "e3": None,
        "e4": None,
    }
    assert {h.event_id: h.receipt for h in await store.history_after(0)} == expected
    assert [(h.event_id, h.receipt) for h in await store.task_history("T")] == [
        ("e1", expected["e1"]),
        ("e2", expected["e2"]),
    ]
    assert [h.receipt for h in await store.history_after(0, task_id="T")] == [
        expected["e1"],
        expected["e2"],
    ]
    of_tasks = await store.history_of_tasks(["T", "U"], 10**9)
    assert {h.event_id: h.receipt for h in of_tasks} == {
        k: v for k, v in expected.items() if k != "a1"
    }
    # A later duplicate with another receipt changes nothing either.
    again = await store.ingest_raw([ev("e2", "T", "running", 2)], "w", 8, receipts=[Receipt("9")])
    assert again.outcomes == [Outcome.DUPLICATE]
    assert [h.receipt for h in await store.task_history("T")] == [expected["e1"], expected["e2"]]
    # Without receipts, as before: none.
    await store.ingest_raw([ev("e5", "T", "failed", 3)], "kafka", 9)
    assert (await store.task_history("T"))[-1].receipt is None
    with pytest.raises(ValueError, match="receipts for"):
        await store.ingest_raw([ev("e6", "T", "failed", 4)], "w", 10, receipts=[])


async def test_ingest_keeps_each_events_receipt(store: Store) -> None:
    events = [decode(ev("e1", "T", "pending", 1)), decode(ev("e2", "T", "running", 2))]
    events[1].receipt = Receipt("rotated", TRACE_B)
    result = await store.ingest(events, "webhook", 1)
    assert result.outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert [h.receipt for h in await store.task_history("T")] == [None, Receipt("rotated", TRACE_B)]
    assert [c.traceparent for c in result.changes] == [None, TRACE_B]


async def test_a_change_carries_the_traceparent_of_the_event_that_made_it(store: Store) -> None:
    result = await store.ingest_raw(
        [
            ev("e1", "T", "pending", 1),
            ev("e2", "T", "running", 2),
            ev("e3", "U", "pending", 1),
            ev("old", "T", "pending", 0),  # older: kept, moves nothing
            ev("e4", "T", "completed", 3),
        ],
        "webhook",
        5,
        receipts=[
            Receipt("0", TRACE_A),
            Receipt("0"),
            Receipt(None, TRACE_B),
            Receipt("0", TRACE_B),
            None,
        ],
    )
    moved = [(c.task_id, c.phase, c.traceparent) for c in result.changes]
    assert moved == [
        ("T", "pending", TRACE_A),
        ("T", "running", None),
        ("U", "pending", TRACE_B),
        ("T", "completed", None),
    ]
    as_read = [(c.task_id, c.phase, c.traceparent) for c in await store.changes_after(0)]
    assert as_read == moved
    assert [c.traceparent for c in await store.task_changes("U")] == [TRACE_B]
    seqs = [c.seq for c in result.changes]
    assert await store.changes_by_seq(seqs) == result.changes
    handed = PhaseChange.from_record(result.changes[0], handler="h")
    assert handed.traceparent == TRACE_A
    assert PhaseChange.from_record(result.changes[1], handler="h").traceparent is None


async def test_event_ids_are_deduplicated_within_their_task(store: Store) -> None:
    # Livepeer never reuses an event id across tasks; if a producer did, each task still
    # folds its own event (the history dedups on (task, event id)).
    result = await store.ingest(
        [decode(ev("e1", "A", "pending", 1)), decode(ev("e1", "B", "pending", 1))], "w", 1
    )
    assert result.outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert (await store.get_task("A")) is not None and (await store.get_task("B")) is not None
    again = await store.ingest([decode(ev("e1", "B", "pending", 1))], "w", 2)
    assert again.outcomes == [Outcome.DUPLICATE]


async def test_older_event_is_kept_in_history_but_changes_nothing(store: Store) -> None:
    await store.ingest([decode(ev("new", "T", "completed", 10))], "webhook", 1)
    before = await store.get_task("T")
    result = await store.ingest([decode(ev("old", "T", "running", 5))], "webhook", 2)
    assert result.outcomes == [Outcome.ACCEPTED] and result.changes == []
    after = await store.get_task("T")
    assert after == before
    assert [h.event_id for h in await store.task_history("T")] == ["new", "old"]


async def test_version_bumps_only_on_change(store: Store) -> None:
    await store.ingest(
        [decode(ev("a", "T", "running", 1, status_extra={"progress": 0.25}))], "w", 1
    )
    v1 = (await store.get_task("T")).version  # type: ignore[union-attr]
    await store.ingest([decode(ev("b", "T", "running", 2, status_extra={"progress": 0.5}))], "w", 2)
    v2 = (await store.get_task("T")).version  # type: ignore[union-attr]
    await store.ingest([decode(ev("c", "T", "running", 0, status_extra={"progress": 0.1}))], "w", 3)
    v3 = (await store.get_task("T")).version  # type: ignore[union-attr]
    assert v2 == v1 + 1 and v3 == v2


async def test_non_task_events_are_kept_and_touch_no_task(store: Store) -> None:
    raw = orjson.dumps(
        {"id": "a1", "createdAt": 1, "event": "asset.ready", "payload": {"asset": {}}}
    )
    result = await store.ingest([decode(raw)], "webhook", 1)
    assert result.outcomes == [Outcome.ACCEPTED]
    stats = await store.stats()
    assert (stats.events, stats.tasks) == (1, 0)


async def test_outbox_reads_in_order_and_cursors_persist(store: Store) -> None:
    await store.ingest(
        [decode(ev("e1", "A", "pending", 1)), decode(ev("e2", "B", "pending", 1))], "w", 1
    )
    first = await store.changes_after(0)
    assert [c.task_id for c in first] == ["A", "B"]
    assert [c.task_id for c in await store.changes_after(first[0].seq)] == ["B"]
    assert [c.task_id for c in await store.changes_by_seq([first[1].seq])] == ["B"]
    assert await store.get_cursor("h") is None
    await store.set_cursor("h", first[0].seq)
    assert await store.get_cursor("h") == first[0].seq
    stats = await store.stats()
    assert (stats.changes, stats.last_change_seq) == (2, first[1].seq)
    assert [c.phase for c in await store.task_changes("A")] == ["pending"]


async def test_updates_recorded_only_when_asked(tmp_path: Path) -> None:
    for record_updates in (False, True):
        store = SQLiteStore(tmp_path / f"u{record_updates}.db", record_updates=record_updates)
        await store.open()
        try:
            progress = {"status_extra": {"progress": 0.5}}
            await store.ingest(
                [
                    decode(ev("a", "T", "running", 1)),
                    decode(ev("b", "T", "running", 2, **progress)),
                ],
                "w",
                1,
            )
            kinds = [(c.kind, c.previous_phase, c.phase) for c in await store.changes_after(0)]
            expected: list[tuple[str, str | None, str]] = [("phase", None, "running")]
            if record_updates:
                expected.append(("update", "running", "running"))
            assert kinds == expected
        finally:
            await store.close()


async def test_delivery_records(store: Store) -> None:
    done = Delivery("h", 1, DeliveryStatus.DONE, 1, 10, 10)
    dead = Delivery("h", 2, DeliveryStatus.DEAD, 3, 10, 30, "HTTP 400")
    other = Delivery("g", 2, DeliveryStatus.DEAD, 1, 10, 10, "boom")
    replayed = Delivery("h", 1, DeliveryStatus.DONE, 1, 50, 50, replay=True)
    await store.record_deliveries([done, dead, other, replayed])
    assert await store.deliveries_for("h", [1, 2, 3]) == {1: done, 2: dead}
    assert await store.deliveries_for("h", [1], replay=True) == {1: replayed}
    assert await store.list_deliveries([DeliveryStatus.DEAD]) == [other, dead]
    assert await store.list_deliveries([DeliveryStatus.DEAD], "h") == [dead]
    moved = await store.set_delivery_status(
        DeliveryStatus.DEAD, DeliveryStatus.REDRIVE, handler="h"
    )
    assert moved == 1
    assert (await store.deliveries_for("h", [2]))[2].status is DeliveryStatus.REDRIVE
    dropped = await store.set_delivery_status(DeliveryStatus.DEAD, DeliveryStatus.DROPPED, seqs=[2])
    assert dropped == 1  # g's; h's is no longer dead
    assert await store.list_deliveries([DeliveryStatus.DEAD]) == []
    # Replacing a record (a retry that later succeeded) keeps one row per key.
    await store.record_deliveries([replace(dead, status=DeliveryStatus.DONE)])
    assert (await store.deliveries_for("h", [2]))[2].status is DeliveryStatus.DONE


async def test_list_filters_and_paginates(store: Store) -> None:
    events = []
    for i in range(25):
        phase = "completed" if i % 2 else "running"
        events.append(
            decode(
                webhook_body(
                    f"e{i}",
                    {
                        **snapshot(f"T{i:02d}", phase, 100 + i),
                        "type": "clip" if i % 3 == 0 else "upload",
                    },
                )
            )
        )
    await store.ingest(events, "w", 1)
    seen: list[str] = []
    cursor: Cursor | None = None
    while True:
        page = await store.list_tasks(TaskQuery(phases=("completed",), after=cursor, limit=5))
        seen.extend(t.id for t in page.tasks)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"T{i:02d}" for i in range(25) if i % 2]
    since = await store.list_tasks(TaskQuery(updated_since=120, limit=100))
    assert [t.id for t in since.tasks] == [f"T{i:02d}" for i in range(20, 25)]
    clips = await store.list_tasks(TaskQuery(types=("clip",), limit=100, descending=True))
    assert [t.id for t in clips.tasks] == [f"T{i:02d}" for i in reversed(range(0, 25, 3))]
    desc = await store.list_tasks(TaskQuery(limit=3, descending=True))
    rest = await store.list_tasks(TaskQuery(limit=100, descending=True, after=desc.next_cursor))
    assert [t.id for t in desc.tasks + rest.tasks] == [f"T{i:02d}" for i in reversed(range(25))]


def asset_event(event_id: str, t: int) -> bytes:
    return orjson.dumps(
        {"id": event_id, "createdAt": t, "event": "asset.ready", "payload": {"asset": {}}}
    )


async def test_history_after_is_in_seq_order_with_limit_and_task_filter(store: Store) -> None:
    first = [
        ev("e1", "A", "pending", 1),
        ev("e2", "B", "pending", 1),
        ev("e3", "A", "running", 2),
        asset_event("a1", 3),
        ev("e4", "B", "running", 2),
    ]
    await store.ingest([decode(raw) for raw in first], "webhook", 1000)
    await store.ingest([decode(ev("e5", "A", "completed", 3))], "kafka", 2000)

    everything = await store.history_after(0)
    assert [h.event_id for h in everything] == ["e1", "e2", "e3", "a1", "e4", "e5"]
    seqs = [h.seq for h in everything]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > 0
    assert [h.raw for h in everything] == [*first, ev("e5", "A", "completed", 3)]
    assert [h.task_id for h in everything] == ["A", "B", "A", None, "B", "A"]
    assert [(h.source, h.received_at) for h in everything] == [("webhook", 1000)] * 5 + [
        ("kafka", 2000)
    ]
    assert everything[3].kind == "asset.ready" and everything[3].created_at == 3

    assert await store.history_after(seqs[1]) == everything[2:]
    assert await store.history_after(seqs[1], 2) == everything[2:4]
    assert await store.history_after(seqs[-1]) == []
    of_a = await store.history_after(0, task_id="A")
    assert [h.event_id for h in of_a] == ["e1", "e3", "e5"]
    assert of_a == [h for h in everything if h.task_id == "A"]
    assert [h.event_id for h in await store.history_after(seqs[0], 1, task_id="A")] == ["e3"]
    assert await store.history_after(seqs[2], task_id="B") == [everything[4]]
    assert await store.history_after(0, task_id="nobody") == []


async def test_task_ids_after_pages_in_id_order(store: Store) -> None:
    ids = ["b", "a", "B", "a-1", "a_2", "ab", "Z9", "0", "a.b", "\u00e9t\u00e9", "~"]
    events = [decode(ev(f"e-{i}", task_id, "pending", 1)) for i, task_id in enumerate(ids)]
    events.append(decode(asset_event("untasked", 1)))  # no task: not listed
    await store.ingest(events, "w", 1)
    # A task with several events, and an older one, is listed once.
    await store.ingest([decode(ev("e-again", "a", "running", 5))], "w", 2)
    await store.ingest([decode(ev("e-old", "a", "waiting", 0))], "w", 3)

    expected = sorted(ids)  # Python's order: by code point, as the bytes of UTF-8
    assert await store.task_ids_after(None) == expected
    assert await store.task_ids_after("a") == [i for i in expected if i > "a"]
    assert await store.task_ids_after("", 3) == expected[:3]
    assert await store.task_ids_after(expected[-1]) == []
    paged: list[str] = []
    after: str | None = None
    while page := await store.task_ids_after(after, 4):
        assert len(page) <= 4
        paged.extend(page)
        after = page[-1]
    assert paged == expected


async def test_history_of_tasks_stops_at_upto_seq_by_task_then_seq(store: Store) -> None:
    await store.ingest(
        [
            decode(ev("c1", "C", "pending", 1)),
            decode(ev("b1", "B", "pending", 1)),
            decode(ev("a1", "A", "pending", 1)),
            decode(ev("b2", "B", "running", 2)),
            decode(ev("a2", "A", "running", 2)),
        ],
        "w",
        1,
    )
    upto = (await store.stats()).last_event_seq
    await store.ingest(
        [decode(ev("a3", "A", "completed", 3)), decode(ev("b3", "B", "failed", 3))], "w", 2
    )

    entries = await store.history_of_tasks(["B", "A", "nobody"], upto)
    assert [(h.task_id, h.event_id) for h in entries] == [
        ("A", "a1"),
        ("A", "a2"),
        ("B", "b1"),
        ("B", "b2"),
    ]
    assert all(h.seq <= upto for h in entries)
    by_seq = {h.seq: h for h in await store.history_after(0)}
    assert all(by_seq[h.seq] == h for h in entries)

    everything = await store.history_of_tasks(["A", "B", "C"], (await store.stats()).last_event_seq)
    assert [h.event_id for h in everything] == ["a1", "a2", "a3", "b1", "b2", "b3", "c1"]
    assert await store.history_of_tasks(["A"], 0) == []
    assert await store.history_of_tasks([], upto) == []


async def test_task_changes_and_changes_by_seq(store: Store) -> None:
    await store.ingest(
        [decode(ev("a1", "A", "pending", 1)), decode(ev("b1", "B", "pending", 1))], "w", 10
    )
    await store.ingest([decode(ev("a2", "A", "running", 2))], "w", 20)
    await store.ingest(
        [decode(ev("a3", "A", "completed", 3)), decode(ev("a0", "A", "waiting", 0))], "w", 30
    )

    of_a = await store.task_changes("A")
    assert [(c.previous_phase, c.phase, c.event_id) for c in of_a] == [
        (None, "pending", "a1"),
        ("pending", "running", "a2"),
        ("running", "completed", "a3"),
    ]
    assert [c.recorded_at for c in of_a] == [10, 20, 30]
    assert [c.changed_at for c in of_a] == [1, 2, 3]
    assert of_a[-1].task == (await store.get_task("A")).task  # type: ignore[union-attr]
    seqs = [c.seq for c in of_a]
    assert seqs == sorted(seqs) and all(c.task_id == "A" for c in of_a)
    assert [c.phase for c in await store.task_changes("B")] == ["pending"]
    assert await store.task_changes("nobody") == []

    everything = await store.changes_after(0)
    by_seq = {c.seq: c for c in everything}
    assert await store.changes_by_seq([seqs[2], seqs[0], 10_000]) == [
        by_seq[seqs[0]],
        by_seq[seqs[2]],
    ]
    assert await store.changes_by_seq([]) == []
    assert await store.changes_by_seq([c.seq for c in reversed(everything)]) == everything


async def test_set_delivery_status_moves_only_matching_records(store: Store) -> None:
    records = [
        Delivery("h", 1, DeliveryStatus.DEAD, 3, 10, 30, "HTTP 500"),
        Delivery("h", 2, DeliveryStatus.DEAD, 8, 10, 80, "timeout"),
        Delivery("h", 3, DeliveryStatus.DONE, 1, 10, 10),
        Delivery("g", 1, DeliveryStatus.DEAD, 1, 10, 10, "HTTP 400"),
        Delivery("g", 2, DeliveryStatus.FAILING, 2, 10, 20, "refused"),
    ]
    await store.record_deliveries(records)

    assert (
        await store.set_delivery_status(DeliveryStatus.DEAD, DeliveryStatus.REDRIVE, seqs=[]) == 0
    )
    moved = await store.set_delivery_status(
        DeliveryStatus.DEAD, DeliveryStatus.REDRIVE, handler="h", seqs=[2, 3, 99]
    )
    assert moved == 1  # h/3 is done, not dead; seq 99 has no record
    assert (await store.deliveries_for("h", [2]))[2] == replace(
        records[1], status=DeliveryStatus.REDRIVE
    )  # only the status moved: attempts, times and error are kept
    assert (
        await store.set_delivery_status(DeliveryStatus.DEAD, DeliveryStatus.DROPPED, seqs=[1]) == 2
    )  # h/1 and g/1, any handler
    assert await store.set_delivery_status(DeliveryStatus.DEAD, DeliveryStatus.DROPPED) == 0
    assert (
        await store.set_delivery_status(DeliveryStatus.REDRIVE, DeliveryStatus.DEAD, handler="g")
        == 0
    )
    assert await store.set_delivery_status(DeliveryStatus.REDRIVE, DeliveryStatus.DEAD) == 1

    status = {
        (d.handler, d.seq): d.status
        for d in await store.list_deliveries(list(DeliveryStatus), limit=100)
    }
    assert status == {
        ("h", 1): DeliveryStatus.DROPPED,
        ("h", 2): DeliveryStatus.DEAD,
        ("h", 3): DeliveryStatus.DONE,
        ("g", 1): DeliveryStatus.DROPPED,
        ("g", 2): DeliveryStatus.FAILING,
    }


async def test_list_deliveries_filters_by_status_and_handler_in_seq_order(store: Store) -> None:
    dead_h5 = Delivery("h", 5, DeliveryStatus.DEAD, 8, 1, 2, "e5")
    dead_g5 = Delivery("g", 5, DeliveryStatus.DEAD, 8, 1, 2, "e5")
    failing_h2 = Delivery("h", 2, DeliveryStatus.FAILING, 2, 1, 2, "e2")
    redrive_g1 = Delivery("g", 1, DeliveryStatus.REDRIVE, 8, 1, 2, "e1")
    done_h1 = Delivery("h", 1, DeliveryStatus.DONE, 1, 1, 1)
    dead_replay_h3 = Delivery("h", 3, DeliveryStatus.DEAD, 1, 1, 1, "e3", replay=True)
    await store.record_deliveries([dead_h5, done_h1, redrive_g1, dead_g5, dead_replay_h3])
    await store.record_deliveries([failing_h2])

    attention = [DeliveryStatus.DEAD, DeliveryStatus.FAILING, DeliveryStatus.REDRIVE]
    # By seq, then handler; replays are delivery records too, marked as such.
    assert await store.list_deliveries(attention) == [
        redrive_g1,
        failing_h2,
        dead_replay_h3,
        dead_g5,
        dead_h5,
    ]
    assert await store.list_deliveries(attention, limit=2) == [redrive_g1, failing_h2]
    assert await store.list_deliveries(attention, "h") == [failing_h2, dead_replay_h3, dead_h5]
    assert await store.list_deliveries(attention, "h", 1) == [failing_h2]
    assert await store.list_deliveries([DeliveryStatus.DEAD], "g") == [dead_g5]
    assert await store.list_deliveries([DeliveryStatus.DONE]) == [done_h1]
    assert await store.list_deliveries([DeliveryStatus.DROPPED]) == []
    assert await store.list_deliveries(attention, "nobody") == []


async def test_deliveries_for_keeps_replays_apart(store: Store) -> None:
    live = Delivery("h", 1, DeliveryStatus.DONE, 1, 10, 10)
    replayed = Delivery("h", 1, DeliveryStatus.DEAD, 2, 50, 60, "boom", replay=True)
    replay_only = Delivery("h", 2, DeliveryStatus.DONE, 1, 50, 50, replay=True)
    other = Delivery("g", 1, DeliveryStatus.DONE, 1, 10, 10)
    await store.record_deliveries([live, replayed, replay_only, other])

    assert await store.deliveries_for("h", [1, 2, 3]) == {1: live}
    assert await store.deliveries_for("h", [1, 2, 3], replay=True) == {1: replayed, 2: replay_only}
    assert await store.deliveries_for("h", []) == {}
    # Replacing the replay record leaves the live one as it was, and the other way round.
    done = replace(replayed, status=DeliveryStatus.DONE, attempts=3, error=None)
    await store.record_deliveries([done])
    assert await store.deliveries_for("h", [1], replay=True) == {1: done}
    assert await store.deliveries_for("h", [1]) == {1: live}
    await store.record_deliveries([replace(live, attempts=2, last_attempt_at=70)])
    assert (await store.deliveries_for("h", [1], replay=True))[1] == done
    assert await store.deliveries_for("g", [1, 2]) == {1: other}


async def test_record_deliveries_replaces_a_record(store: Store) -> None:
    failing = Delivery("h", 7, DeliveryStatus.FAILING, 1, 100, 100, "HTTP 503")
    await store.record_deliveries([failing])
    again = replace(failing, attempts=2, last_attempt_at=200, error="timed out")
    await store.record_deliveries([again])
    assert await store.deliveries_for("h", [7]) == {7: again}
    assert await store.list_deliveries([DeliveryStatus.FAILING]) == [again]
    # One batch may carry a failing record and the final one of the same key: the last wins.
    done = replace(again, status=DeliveryStatus.DONE, attempts=3, last_attempt_at=300, error=None)
    await store.record_deliveries([replace(again, attempts=3), done])
    assert await store.deliveries_for("h", [7]) == {7: done}  # the error is gone too
    assert await store.list_deliveries([DeliveryStatus.FAILING]) == []
    assert await store.list_deliveries([DeliveryStatus.DONE]) == [done]
    await store.record_deliveries([done])  # idempotent
    assert await store.list_deliveries(list(DeliveryStatus)) == [done]
    await store.record_deliveries([])


async def test_meta_notes_set_replace_and_delete(store: Store) -> None:
    assert await store.get_meta("rebuild") is None
    await store.set_meta("rebuild", '{"after": "T1"}')
    await store.set_meta("import:x", "1500")
    assert await store.get_meta("rebuild") == '{"after": "T1"}'
    await store.set_meta("rebuild", '{"after": "T2"}')
    assert await store.get_meta("rebuild") == '{"after": "T2"}'
    await store.set_meta("rebuild", "")  # empty is a value, not a deletion
    assert await store.get_meta("rebuild") == ""
    await store.set_meta("rebuild", None)
    assert await store.get_meta("rebuild") is None
    await store.set_meta("rebuild", None)  # deleting what is not there is fine
    assert await store.get_meta("import:x") == "1500"


def fold(raws: list[bytes]) -> dict[str, TaskState]:
    """Task states folded from scratch, as a rebuild stages them."""
    events: list[Event] = [decode(raw) for raw in raws]
    return dict(plan_batch(events, (), {}, record_changes=False).states)


async def view_of(store: Store) -> dict[str, StoredTask]:
    page = await store.list_tasks(TaskQuery(limit=1000))
    assert page.next_cursor is None
    return {t.id: t for t in page.tasks}


async def test_stage_and_swap_rebuilt_replace_the_view(store: Store) -> None:
    a1, b1, c1 = (
        ev("a1", "A", "pending", 1),
        ev("b1", "B", "pending", 1),
        ev("c1", "C", "failed", 1),
    )
    await store.ingest([decode(a1), decode(b1), decode(c1)], "w", 1)
    before = await view_of(store)
    upto = (await store.stats()).last_event_seq

    # Staged states are kept aside: the view does not change, and discard forgets them.
    await store.stage_rebuilt(fold([ev("zz", "A", "bogus", 9), ev("zz", "X", "bogus", 9)]))
    assert await view_of(store) == before
    await store.discard_rebuilt()

    # A rebuild stages in batches: A, then B folded differently from the live view (as
    # from a view corrupted behind phasewatch's back); C is not staged.
    await store.stage_rebuilt(fold([a1]))
    b_rebuilt = fold([b1, ev("b2", "B", "running", 2, scheduledAt=2)])
    await store.stage_rebuilt(b_rebuilt)
    assert await view_of(store) == before
    # Events past upto_seq arrived meanwhile: folded into the live view now, and into the
    # staged one by the swap.
    await store.ingest(
        [decode(ev("a2", "A", "running", 5)), decode(ev("d1", "D", "pending", 4))], "w", 2
    )
    live = await view_of(store)
    assert live["A"].version == before["A"].version + 1

    assert await store.swap_rebuilt(upto) == 3
    after = await view_of(store)
    assert sorted(after) == ["A", "B", "D"]  # C had no staged state: removed
    assert await store.get_task("C") is None
    # The late events were folded in: A is running, D is there; their docs did not change
    # from the live view's, so neither did their versions.
    assert after["A"] == live["A"] and after["A"].phase == "running"
    assert after["D"] == live["D"]
    # B's doc changed: its version bumped, once.
    assert after["B"].task == b_rebuilt["B"].task and after["B"].phase == "running"
    assert after["B"].version == before["B"].version + 1
    assert (await store.stats()).tasks == 3
    assert (await store.list_tasks(TaskQuery(phases=("failed",)))).tasks == []

    # The staged set is used up: a second swap of the same states changes no version.
    await store.stage_rebuilt(fold([a1, ev("a2", "A", "running", 5)]))
    await store.stage_rebuilt(b_rebuilt)
    await store.stage_rebuilt(fold([ev("d1", "D", "pending", 4)]))
    assert await store.swap_rebuilt((await store.stats()).last_event_seq) == 3
    assert await view_of(store) == after
    # Nothing stays staged after a swap: one more swap with none staged empties the view.
    assert await store.swap_rebuilt((await store.stats()).last_event_seq) == 0
    assert await view_of(store) == {}
    assert (await store.stats()).tasks == 0


async def test_stats_count_events_tasks_and_changes(store: Store) -> None:
    empty = await store.stats()
    assert (
        empty.events,
        empty.tasks,
        empty.changes,
        empty.last_change_seq,
        empty.last_event_seq,
    ) == (0, 0, 0, 0, 0)

    await store.ingest(
        [
            decode(ev("a1", "A", "pending", 1)),
            decode(asset_event("x1", 1)),
            decode(ev("b1", "B", "pending", 1)),
            decode(ev("a2", "A", "running", 2)),
        ],
        "w",
        1,
    )
    stats = await store.stats()
    history = await store.history_after(0)
    changes = await store.changes_after(0)
    assert (stats.events, stats.tasks, stats.changes) == (4, 2, 3)
    assert stats.last_event_seq == history[-1].seq
    assert stats.last_change_seq == changes[-1].seq

    await store.ingest([decode(ev("a1", "A", "pending", 1))], "w", 2)  # a duplicate
    assert await store.stats() == stats
    await store.ingest([decode(ev("a0", "A", "waiting", 0))], "w", 3)  # older: no change
    older = await store.stats()
    assert (older.events, older.tasks, older.changes) == (5, 2, 3)
    assert older.last_event_seq > stats.last_event_seq
    assert older.last_change_seq == stats.last_change_seq
    await store.ingest([decode(ev("c1", "C", "pending", 1))], "w", 4)
    newer = await store.stats()
    assert (newer.events, newer.tasks, newer.changes) == (6, 3, 4)
    assert newer.last_change_seq == (await store.changes_after(0))[-1].seq
    assert newer.last_event_seq == (await store.history_after(0))[-1].seq


BIG = 1_700_000_000_123  # Unix ms, as Livepeer sends them


async def test_list_tasks_keeps_float_and_big_ms_times(store: Store) -> None:
    times: dict[str, int | float] = {
        "f15": 1.5,
        "i2": 2,
        "f25": 2.5,
        "big": BIG,
        "big-twin": BIG,  # the same time: ordered by id
        "big-half": BIG + 0.5,
        "big-next": BIG + 1,
    }
    snapshots = [
        {**snapshot(task_id, "running", 0), "status": {"phase": "running", "updatedAt": t}}
        for task_id, t in times.items()
    ]
    await store.ingest([decode(webhook_body(f"e-{s['id']}", s)) for s in snapshots], "w", 1)
    order = ["f15", "i2", "f25", "big", "big-twin", "big-half", "big-next"]

    async def ids(**query: object) -> list[str]:
        page = await store.list_tasks(TaskQuery(limit=100, **query))  # type: ignore[arg-type]
        return [t.id for t in page.tasks]

    assert await ids() == order
    assert await ids(descending=True) == list(reversed(order))
    assert await ids(updated_since=1.5) == order
    assert await ids(updated_since=1.6) == order[1:]
    assert await ids(updated_since=2) == order[1:]
    assert await ids(updated_since=2.25) == order[2:]
    assert await ids(updated_since=BIG) == order[3:]
    assert await ids(updated_since=BIG + 0.25) == ["big-half", "big-next"]
    assert await ids(updated_since=BIG + 1) == ["big-next"]
    assert await ids(updated_since=BIG + 2) == []
    assert await ids(updated_since=BIG, descending=True) == list(reversed(order[3:]))
    assert await ids(updated_since=2, phases=("running",), types=("upload",)) == order[1:]

    # The times come back as they were sent: ints stay ints, fractions stay.
    for task_id, t in times.items():
        stored = await store.get_task(task_id)
        assert stored is not None and stored.updated_at == t
        assert type(stored.updated_at) is type(t), task_id

    # Page by page, one task a page: the cursors carry those times exactly.
    for descending in (False, True):
        seen: list[str] = []
        cursor: Cursor | None = None
        while True:
            page = await store.list_tasks(TaskQuery(after=cursor, limit=1, descending=descending))
            seen.extend(t.id for t in page.tasks)
            if page.next_cursor is None:
                break
            assert page.next_cursor.updated_at == times[page.tasks[-1].id]
            cursor = Cursor.decode(page.next_cursor.encode())  # as a client hands it back
        assert seen == (list(reversed(order)) if descending else order)

    after_big = await store.list_tasks(TaskQuery(after=Cursor(BIG, "big"), limit=100))
    assert [t.id for t in after_big.tasks] == ["big-twin", "big-half", "big-next"]
    since_and_after = await store.list_tasks(
        TaskQuery(updated_since=1.5, after=Cursor(2.5, "f25"), limit=2)
    )
    assert [t.id for t in since_and_after.tasks] == ["big", "big-twin"]
    assert since_and_after.next_cursor == Cursor(BIG, "big-twin")


@pytest.mark.parametrize("fixture", ["small", "messy"])
async def test_fixture_batches_fold_to_expected(store: Store, fixture: str) -> None:
    events = [decode(d.body) for d in deliveries(fixture)]
    for start in range(0, len(events), 97):
        await store.ingest(events[start : start + 97], "webhook", start)
    expected = expected_tasks(fixture)
    for task_id, task in expected.items():
        stored = await store.get_task(task_id)
        assert stored is not None and stored.task == task
    assert (await store.stats()).tasks == len(expected)


async def test_sqlite_batch_is_all_or_nothing(tmp_path: pytest.TempPathFactory) -> None:
    store = SQLiteStore(tmp_path / "x.db")  # type: ignore[operator]
    await store.open()
    try:
        good = decode(ev("ok", "T", "pending", 1))
        bad = decode(ev("bad", "U", "pending", 1))
        # A value SQLite cannot bind makes the whole batch fail, and nothing of it lands.
        object.__setattr__(bad, "raw", object())
        with pytest.raises(sqlite3.Error):
            await store.ingest([good, bad], "w", 1)
        assert await store.get_task("T") is None
        assert (await store.stats()).events == 0
        assert (await store.ingest([good], "w", 2)).outcomes == [Outcome.ACCEPTED]
    finally:
        await store.close()


async def test_sqlite_state_survives_reopen(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "x.db"  # type: ignore[operator]
    first = SQLiteStore(path)
    await first.open()
    await first.ingest([decode(ev("e1", "T", "running", 5, scheduledAt=3))], "w", 1)
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        # The per-field keys came back too: an older snapshot still cannot win.
        await second.ingest([decode(ev("e0", "T", "waiting", 4, scheduledAt=1))], "w", 2)
        stored = await second.get_task("T")
        assert stored is not None and stored.phase == "running" and stored.task["scheduledAt"] == 3
    finally:
        await second.close()


async def test_lease_has_one_holder_until_it_expires(store: Store) -> None:
    assert await store.acquire_lease("dispatch", "a", 1000, now_ms=0) == "a"
    assert await store.acquire_lease("dispatch", "b", 1000, now_ms=500) == "a"
    assert await store.acquire_lease("dispatch", "a", 1000, now_ms=900) == "a"  # renewed
    assert await store.acquire_lease("dispatch", "b", 1000, now_ms=1500) == "a"
    assert await store.acquire_lease("dispatch", "b", 1000, now_ms=2000) == "b"  # expired
    # A holder known to be dead can be taken over at once.
    assert await store.acquire_lease("dispatch", "c", 1000, now_ms=2001, take_from="b") == "c"
    assert await store.acquire_lease("other", "b", 1000, now_ms=2001) == "b"


async def test_lease_holders_lists_the_unexpired_leases_of_a_prefix(store: Store) -> None:
    await store.acquire_lease("lane:1", "a", 1000, now_ms=0)
    await store.acquire_lease("lane:2", "b", 5000, now_ms=0)
    await store.acquire_lease("lane_3", "c", 5000, now_ms=0)  # '_' is not a wildcard
    await store.acquire_lease("member:a", "a", 5000, now_ms=0)
    assert await store.lease_holders("lane:", now_ms=500) == {"lane:1": "a", "lane:2": "b"}
    assert await store.lease_holders("lane:", now_ms=2000) == {"lane:2": "b"}  # 1 expired
    await store.release_lease("lane:2", "b")
    assert await store.lease_holders("lane:", now_ms=2000) == {}


@pytest.mark.slow  # spawns (and kills) writer processes
async def test_process_writer_restarts_after_its_child_dies(tmp_path: Path) -> None:
    store = SQLiteProcessStore(tmp_path / "p.db")
    await store.open()
    try:
        assert (await store.ingest([decode(ev("a", "T", "pending", 1))], "w", 1)).outcomes == [
            Outcome.ACCEPTED
        ]
        store.kill_writer()  # the writer dies (OOM killer, operator)
        with pytest.raises(RuntimeError, match="died"):
            await store.ingest([decode(ev("b", "T", "running", 2))], "w", 2)
        # The sender retries: a new writer takes it.
        assert (await store.ingest([decode(ev("b", "T", "running", 2))], "w", 3)).outcomes == [
            Outcome.ACCEPTED
        ]
        stored = await store.get_task("T")
        assert stored is not None and stored.phase == "running"
    finally:
        await store.close()


@pytest.mark.slow  # spawns (and kills) writer processes
async def test_process_writer_answers_queued_batches_in_order(tmp_path: Path) -> None:
    store = SQLiteProcessStore(tmp_path / "q.db")
    await store.open()
    try:
        # Batch i repeats batch i-1's event: a duplicate only if they commit in order.
        batches = [[ev(f"e{i}", "T", "running", i)] for i in range(12)]
        batches = [b + (batches[i - 1] if i else []) for i, b in enumerate(batches)]
        results = await asyncio.gather(
            *(store.ingest_raw(b, "w", i) for i, b in enumerate(batches))
        )
        assert results[0].outcomes == [Outcome.ACCEPTED]
        assert all(r.outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE] for r in results[1:])
        assert [c.event_id for r in results for c in r.changes] == ["e0"]
    finally:
        await store.close()


def _open_files(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    return {os.path.realpath(fds / fd) for fd in os.listdir(fds)}


@pytest.mark.slow  # spawns a writer process
async def test_process_store_opens_only_once_its_writer_holds_the_database(
    tmp_path: Path,
) -> None:
    # A service answers /readyz once its store is open: the first webhook must not wait
    # for the writer process to finish starting (it waited ~0.6 s, importing).
    path = tmp_path / "ready.db"
    store = SQLiteProcessStore(path)
    await store.open()
    try:
        pid = store.writer_pid
        assert pid is not None
        assert str(path.resolve()) in _open_files(pid)
    finally:
        await store.close()


@pytest.mark.slow  # spawns (and kills) writer processes
async def test_process_writer_death_fails_every_queued_batch_once(tmp_path: Path) -> None:
    store = SQLiteProcessStore(tmp_path / "d.db")
    await store.open()
    try:
        first = store.writer_pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)  # batches queue up behind a stuck writer
        queued = [
            asyncio.create_task(store.ingest_raw([ev(f"x{i}", "U", "pending", i)], "w", i))
            for i in range(3)
        ]
        await asyncio.sleep(0.2)
        os.kill(first, signal.SIGKILL)
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "died" in str(r) for r in results)
        now = store.writer_pid
        assert now is not None and now != first  # one new writer
        os.kill(now, 0)  # alive
        again = await store.ingest_raw([ev("x0", "U", "pending", 0)], "w", 9)
        assert again.outcomes == [Outcome.ACCEPTED]
    finally:
        await store.close()


@pytest.mark.slow  # spawns a writer process
async def test_process_writer_keeps_receipts_in_place_when_a_batch_is_split(
    tmp_path: Path,
) -> None:
    """Keys split a batch between this process (plans) and the writer (folds): each
    part takes its raws' receipts, in place."""
    store = SQLiteProcessStore(tmp_path / "split.db", fold_here=0.5)
    await store.open()
    try:
        tasks = [f"T{i}" for i in range(24)]
        raws = [ev(f"e-{t}", t, "pending", 1) for t in tasks]
        receipts = [Receipt(str(i), TRACE_A if i % 2 else None) for i in range(len(tasks))]
        result = await store.ingest_raw(
            raws, "kafka", 1, keys=[t.encode() for t in tasks], receipts=receipts
        )
        assert store.plans_used == 1  # both sides took part
        assert result.outcomes == [Outcome.ACCEPTED] * len(tasks)
        by_event = {h.event_id: h.receipt for h in await store.history_after(0)}
        assert by_event == {f"e-{t}": r for t, r in zip(tasks, receipts, strict=True)}
        traces = {c.task_id: c.traceparent for c in await store.changes_after(0)}
        assert traces == {t: r.traceparent for t, r in zip(tasks, receipts, strict=True)}
        assert {c.task_id: c.traceparent for c in result.changes} == traces
    finally:
        await store.close()


async def test_sqlite_refuses_an_unversioned_database_it_cannot_migrate(tmp_path: Path) -> None:
    """Version 0 with an events table is version 1 and gets migrated (see
    test_sqlite_migrations.py); one whose tables are not version 1's fails the step, which
    is rolled back, and is refused in one line naming the file and the step."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as con:  # no user_version, and not version 1's events
        con.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE)")
    schema = "SELECT name, sql FROM sqlite_master"
    with sqlite3.connect(path) as con:
        before = con.execute(schema).fetchall()
    store = SQLiteStore(path)
    with pytest.raises(StoreOpenError, match="schema migration 2") as raised:
        await store.open()
    await store.close()
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert "rolled back, the database stays at schema 1" in str(raised.value)
    with sqlite3.connect(path) as con:  # left as it was (in WAL mode now)
        assert con.execute(schema).fetchall() == before
        assert con.execute("PRAGMA user_version").fetchone() == (0,)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "the file is empty"),
        (b"not a database at all, just some text " * 100, "not a SQLite database"),
    ],
)
async def test_sqlite_refuses_an_empty_or_foreign_file(
    tmp_path: Path, content: bytes, says: str
) -> None:
    """A zero-length file (a truncated copy, a failed restore) would otherwise open as an
    empty store, losing the history without a word."""
    path = tmp_path / "phasewatch.db"
    path.write_bytes(content)
    store = SQLiteStore(path)
    with pytest.raises(StoreOpenError, match=says) as raised:
        await store.open()
    assert str(path) in str(raised.value)
    await store.close()
    assert path.read_bytes() == content  # left as it was


async def test_sqlite_creates_a_new_file(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sub" / "new.db")
    await store.open()
    try:
        assert (await store.stats()).events == 0
    finally:
        await store.close()


async def _changes_at(store: Store, times: list[int]) -> list[int]:
    """One phase change (a new task) per time, recorded at that time; their seqs."""
    seqs: list[int] = []
    for t in times:
        result = await store.ingest([decode(ev(f"p{t}", f"P{t}", "pending", 1))], "webhook", t)
        seqs.extend(c.seq for c in result.changes)
    return seqs


async def test_prune_changes_by_time_and_count_keeps_the_history(store: Store) -> None:
    seqs = await _changes_at(store, [100, 200, 300, 400, 500])
    assert await store.oldest_change_seq() == 1
    assert await store.prune_changes() == 0  # neither bound given: nothing goes
    assert await store.prune_changes(before_ms=250) == 2
    assert [c.seq for c in await store.changes_after(0)] == seqs[2:]
    assert await store.oldest_change_seq() == seqs[1] + 1
    assert await store.prune_changes(keep_last=1) == 2
    assert [c.seq for c in await store.changes_after(0)] == seqs[4:]
    stats = await store.stats()
    assert (stats.changes, stats.last_change_seq, stats.events) == (1, seqs[4], 5)
    assert len(await store.task_history("P100")) == 1  # the history is untouched
    assert await store.oldest_change_seq() == seqs[3] + 1
    # The next change still follows the last seq, pruned or not.
    later = await _changes_at(store, [600])
    assert later == [seqs[4] + 1]


async def test_prune_never_takes_a_change_a_handler_still_needs(store: Store) -> None:
    seqs = await _changes_at(store, [100, 200, 300, 400])
    await store.set_cursor("slow@0/2", seqs[1])  # lane cursors of handler "slow"
    await store.set_cursor("slow@1/2", seqs[2])
    await store.set_cursor("gone", 0)  # a handler this service no longer runs
    await store.record_deliveries([Delivery("slow", seqs[0], DeliveryStatus.DEAD, 3, 1, 2, "boom")])
    # Every cursor counts by default: "gone" holds everything back.
    assert await store.prune_changes(before_ms=10_000) == 0
    # Only "slow" is needed: up to its lowest lane cursor, except its dead letter.
    assert await store.prune_changes(before_ms=10_000, needed_by=["slow"]) == 1
    assert [c.seq for c in await store.changes_after(0)] == [seqs[0], seqs[2], seqs[3]]
    assert await store.oldest_change_seq() == seqs[1] + 1


async def test_leases_and_cursors_in_one_call(store: Store) -> None:
    await store.acquire_lease("lane:2", "other", 1000, now_ms=0)
    holders = await store.acquire_leases(["lane:1", "lane:2", "lane:3"], "me", 1000, now_ms=10)
    assert holders == ["me", "other", "me"]  # lane:2 is held by another until 1000
    assert await store.acquire_leases(["lane:2", "lane:1"], "me", 1000, now_ms=1500) == [
        "me",
        "me",
    ]  # expired: taken; renewed
    # lane:3 was not renewed: expired at 1010.
    assert await store.lease_holders("lane:", now_ms=1600) == {"lane:1": "me", "lane:2": "me"}
    assert await store.acquire_leases([], "me", 1000, now_ms=1600) == []
    await store.set_cursors({"h@0/2": 5, "h@1/2": 7})
    await store.set_cursors({"h@1/2": 9})
    await store.set_cursors({})
    assert (await store.get_cursor("h@0/2"), await store.get_cursor("h@1/2")) == (5, 9)
