"""Kafka ingestion against the real broker: the same fold as webhooks, no loss across
crashes, rebalances and broker outages, poison to the DLQ, webhook forwarding."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.core.backoff import Backoff
from consumer.settings import Settings
from consumer.store.base import Store
from consumer.store.sqlite.process import SQLiteProcessStore
from consumer.store.sqlite.store import SQLiteStore
from tests.kafka_fixtures import KafkaBroker, kafka_source
from tests.support import (
    Delivery,
    deliveries,
    expected_changes,
    expected_tasks,
    snapshot,
    wait_until,
    webhook_body,
)

pytestmark = pytest.mark.kafka


def task_key(body: bytes) -> bytes:
    doc = orjson.loads(body)
    return str(doc["payload"]["task"]["id"]).encode()


async def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def kafka_settings(broker: KafkaBroker, topic: str, **extra: Any) -> Settings:
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        kafka_topics=topic,
        kafka_group_id=f"g-{uuid.uuid4().hex[:8]}",
        **extra,
    )


async def assert_expected(store: Store, fixture: str) -> None:
    for task_id, task in expected_tasks(fixture).items():
        stored = await store.get_task(task_id)
        assert stored is not None, task_id
        assert stored.task == task


def distinct_events(fixture: str) -> int:
    return len({d.doc["id"] for d in deliveries(fixture)})


async def wait_for_the_fixture(store: Store, fixture: str) -> None:
    """Until every event of the fixture is stored; then every task must be as expected."""

    async def done() -> bool:
        return (await store.stats()).events == distinct_events(fixture)

    await wait_until(done, timeout=60, what="all events")
    await assert_expected(store, fixture)


@pytest.mark.parametrize("fixture", ["small", "messy"])
async def test_fixture_stream_through_the_writer_process_folds_to_expected(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path, fixture: str
) -> None:
    """As ``serve`` runs by default: part of the tasks folded in the consumer's process,
    the rest in the writer process. In order, every task's phase changes are the
    expected ones, whichever side folded it."""
    stream = sorted(deliveries(fixture), key=Delivery.order_key)
    await produce(
        kafka_broker.bootstrap_servers, kafka_topic, [(task_key(d.body), d.body) for d in stream]
    )
    store = SQLiteProcessStore(tmp_path / "p.db")
    await store.open()
    source = kafka_source(store, kafka_settings(kafka_broker, kafka_topic))
    await source.start()
    try:
        await wait_for_the_fixture(store, fixture)
        if fixture == "small":  # the fixture that comes with its phase changes in order
            for task_id, changes in expected_changes(fixture).items():
                recorded = [[c.previous_phase, c.phase] for c in await store.task_changes(task_id)]
                assert recorded == changes, task_id
        assert store.plans_used > 0  # the consumer's process did fold some batches
        # Nobody else writes these tasks: no plan went stale.
        assert store.plans_refused == 0
        assert (await store.stats()).backend == {"plans_refused": 0}
    finally:
        await source.stop()
        await store.close()


@pytest.mark.parametrize("fixture", ["small", "messy"])
async def test_fixture_stream_on_a_topic_folds_to_expected(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path, fixture: str
) -> None:
    await produce(
        kafka_broker.bootstrap_servers,
        kafka_topic,
        [(task_key(d.body), d.body) for d in deliveries(fixture)],
    )
    store = SQLiteStore(tmp_path / "k.db")
    await store.open()
    source = kafka_source(store, kafka_settings(kafka_broker, kafka_topic))
    await source.start()
    try:
        await wait_for_the_fixture(store, fixture)
        assert source.stats.poison == 0
        # Lag is measured per partition and reaches zero once caught up.
        await wait_until(
            lambda: source.stats.lag and sum(source.stats.lag.values()) == 0,
            timeout=60,
            what="lag 0",
        )
    finally:
        await source.stop()
        await store.close()


async def test_all_three_formats_on_one_topic(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    bus = orjson.dumps(
        {
            "type": "webhook_event",
            "id": "bus-1",
            "timestamp": 20,
            "event": "task.updated",
            "userId": "u",
            "projectId": "p",
            "payload": {"task": {"id": "T", "snapshot": snapshot("T", "running", 20)}},
        }
    )
    bare = orjson.dumps(snapshot("T", "completed", 30))
    hook = webhook_body("wh-1", snapshot("T", "pending", 10), event="task.spawned")
    await produce(
        kafka_broker.bootstrap_servers, kafka_topic, [(b"T", hook), (b"T", bus), (b"T", bare)]
    )
    store = SQLiteStore(tmp_path / "f.db")
    await store.open()
    source = kafka_source(store, kafka_settings(kafka_broker, kafka_topic))
    await source.start()
    try:

        async def three() -> bool:
            return (await store.stats()).events == 3

        await wait_until(three, timeout=60, what="3 events")
        stored = await store.get_task("T")
        assert stored is not None and stored.phase == "completed"
        assert [(c.previous_phase, c.phase) for c in await store.task_changes("T")] == [
            (None, "pending"),
            ("pending", "running"),
            ("running", "completed"),
        ]
    finally:
        await source.stop()
        await store.close()


class Crash(Exception):
    """Stands for the process dying right after a store commit, before its offsets."""


async def test_crash_between_store_commit_and_offset_commit(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    await produce(
        kafka_broker.bootstrap_servers,
        kafka_topic,
        [(task_key(d.body), d.body) for d in deliveries("messy")],
    )
    settings = kafka_settings(kafka_broker, kafka_topic, kafka_max_batch=300)
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()

    stored_batches = 0

    def crash_on_the_second_batch(changes: Any) -> None:
        # The source calls this once a batch is in the store, before it records the
        # batch's offsets for the commit: the 'process' dies there, after the store
        # shows one batch whole, whatever the size of the fixture.
        nonlocal stored_batches
        stored_batches += 1
        if stored_batches == 2:
            raise Crash("the process died")

    crashing = kafka_source(store, settings, on_changes=crash_on_the_second_batch)
    await crashing.start()
    failure = await wait_until(
        lambda: crashing.failure, "the crash to stop consumption", timeout=60
    )
    assert failure.startswith("Crash"), failure
    await crashing.stop()  # leaves the group without committing anything more
    committed_before = (await store.stats()).events
    assert 0 < committed_before < distinct_events("messy"), "the crash should land mid-stream"

    survivor = kafka_source(store, settings)
    await survivor.start()
    try:

        async def done() -> bool:
            return (await store.stats()).events == distinct_events("messy")

        await wait_until(done, timeout=60, what="all events")
        # The batch committed to the store but not to Kafka came again: all duplicates,
        # and it recorded no second phase change.
        assert survivor.stats.duplicates >= 1
        assert committed_before > 0
        await assert_expected(store, "messy")
        changes = [c for t in expected_tasks("messy") for c in await store.task_changes(t)]
        assert len({c.event_id for c in changes}) == len(changes)
        for task_id in expected_tasks("messy"):
            phases = [c.phase for c in await store.task_changes(task_id)]
            assert all(a != b for a, b in itertools.pairwise(phases))
    finally:
        await survivor.stop()
        await store.close()


async def test_poison_records_go_to_the_dlq_with_their_reason(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    good = list(deliveries("small")[:40])
    poison = [
        (b"x", b"this is not json", "not_json"),
        (b"y", b'{"hello": "world"}', "not_an_event"),
        (b"z", webhook_body("p3", {"id": "Z", "status": {"updatedAt": 1}}), "invalid_event"),
        (None, b"", "not_json"),
        # Deeper than the store could write back: it used to stall the partition, its
        # batch retried for ever.
        (
            b"d",
            webhook_body("p5", snapshot("D", "running", 1, params={"x": "@"})).replace(
                b'"@"', b"[" * 300 + b"]" * 300
            ),
            "too_deep",
        ),
    ]
    records: list[tuple[bytes | None, bytes]] = [(task_key(d.body), d.body) for d in good[:20]]
    records += [(k, v) for k, v, _ in poison]
    records += [(task_key(d.body), d.body) for d in good[20:]]
    await produce(kafka_broker.bootstrap_servers, kafka_topic, records)
    store = SQLiteStore(tmp_path / "p.db")
    await store.open()
    source = kafka_source(store, kafka_settings(kafka_broker, kafka_topic))
    await source.start()
    try:

        async def done() -> bool:
            # Dead letters are produced after their batch's store commit, before its
            # offsets are committed.
            stored = (await store.stats()).events == len({d.doc["id"] for d in good})
            return stored and source.stats.poison >= len(poison)

        await wait_until(done, timeout=60, what="good records and dead letters")
        assert source.stats.poison == len(poison)
    finally:
        await source.stop()
        await store.close()
    dlq = AIOKafkaConsumer(
        f"{kafka_topic}.dlq",
        bootstrap_servers=kafka_broker.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await dlq.start()
    try:
        got: list[Any] = []

        async def all_dead_letters() -> bool:
            for batch in (await dlq.getmany(timeout_ms=500)).values():
                got.extend(batch)
            return len(got) >= len(poison)

        await wait_until(all_dead_letters, "every dead letter on the DLQ topic", interval=0)
    finally:
        await dlq.stop()
    by_value = {r.value or b"": dict(r.headers) for r in got}
    assert len(got) == len(poison)
    for _, value, reason in poison:
        headers = by_value[value]
        assert headers["phasewatch.reason"] == reason.encode()
        assert headers["phasewatch.topic"] == kafka_topic.encode()
        assert headers["phasewatch.error"]


async def test_consumer_recovers_from_a_broker_restart(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    if not kafka_broker.can_restart:
        pytest.fail(
            "this test needs the restartable local broker (PHASEWATCH_TEST_KAFKA_BACKEND=local)"
        )
    stream = [(task_key(d.body), d.body) for d in deliveries("messy")]
    half = len(stream) // 2
    await produce(kafka_broker.bootstrap_servers, kafka_topic, stream[:half])
    store = SQLiteStore(tmp_path / "r.db")
    await store.open()
    source = kafka_source(
        store,
        kafka_settings(kafka_broker, kafka_topic, kafka_max_batch=200),
        backoff=Backoff(0.05, 0.2),  # retries soon after the broker is back
    )
    await source.start()
    try:

        async def some() -> bool:
            return (await store.stats()).events > 0

        await wait_until(some, timeout=60, what="first events")
        await asyncio.to_thread(kafka_broker.restart)  # the broker goes away mid-consumption
        await produce(kafka_broker.bootstrap_servers, kafka_topic, stream[half:])

        async def done() -> bool:
            return (await store.stats()).events == distinct_events("messy")

        await wait_until(done, timeout=120, what="catch-up after restart")
        await assert_expected(store, "messy")
    finally:
        await source.stop()
        await store.close()


async def test_a_fault_in_the_consumer_loop_is_reported_not_silent(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    """Consumption that stops for a reason the source does not expect (here a change
    sink that raises) must say so: logged, and in the status /readyz serves."""
    await produce(
        kafka_broker.bootstrap_servers,
        kafka_topic,
        [(task_key(d.body), d.body) for d in deliveries("small")[:20]],
    )

    def broken_sink(changes: Any) -> None:
        raise RuntimeError("the dispatcher is broken")

    store = SQLiteStore(tmp_path / "f.db")
    await store.open()
    settings = kafka_settings(kafka_broker, kafka_topic, kafka_max_batch=2)  # several batches
    source = kafka_source(store, settings, on_changes=broken_sink)
    await source.start()
    try:
        await wait_until(lambda: source.failure, timeout=60, what="the failure reported")
        assert source.status()["failed"] == "RuntimeError: the dispatcher is broken"
    finally:
        await source.stop()  # does not raise: the failure was reported when it happened
        await store.close()


async def test_a_member_without_partitions_is_in_its_group(
    kafka_broker: KafkaBroker, kafka_topic_factory: Any, tmp_path: Path
) -> None:
    """Two members, one partition: both are in the group, one owns nothing, and neither
    is reported overdue (/readyz stays 200 for both)."""
    topic = await kafka_topic_factory(partitions=1)
    settings = kafka_settings(kafka_broker, topic)
    stores = [SQLiteStore(tmp_path / f"m{i}.db") for i in range(2)]
    for store in stores:
        await store.open()
    sources = [kafka_source(store, settings) for store in stores]
    for source in sources:
        await source.start()
    try:

        def settled() -> bool:
            figures = [s.status() for s in sources]
            owned = sorted(len(f["assigned"]) for f in figures)
            return all(f["joined"] for f in figures) and owned == [0, 1]

        await wait_until(settled, "both members in the group, one partition between them")
        assert not any(s.status()["joinOverdue"] for s in sources)
    finally:
        for source in sources:
            await source.stop()
        for store in stores:
            await store.close()
