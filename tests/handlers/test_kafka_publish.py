"""kafka_publish against the real session broker: one record per change, read back."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from handlers import kafka_publish
from tests.handlers.support import assert_no_credentials, make_change
from tests.kafka_fixtures import KafkaBroker


@pytest.mark.kafka
async def test_publishes_one_record_per_change(kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    sub = kafka_publish(kafka_topic, {"bootstrap_servers": kafka_broker.bootstrap_servers})
    assert sub.on_start is not None
    assert sub.on_stop is not None
    changes = [
        make_change(seq=11, task_id="task-a", phase="running", previous=None),
        make_change(seq=12, task_id="task-a", phase="completed", previous="running"),
        make_change(seq=13, task_id="task-b", kind="update", phase="running", previous="running"),
        # Change 12 replayed: the same change, a key of its own.
        make_change(
            seq=12, task_id="task-a", phase="completed", previous="running", replay_run="r1"
        ),
    ]
    await sub.on_start()
    try:
        for change in changes:
            await sub.fn(change)
    finally:
        await sub.on_stop()

    consumer = AIOKafkaConsumer(
        kafka_topic,
        bootstrap_servers=kafka_broker.bootstrap_servers,
        group_id=f"pw-test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(records) < len(changes):
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()

    by_key = {dict(r.headers)["idempotency-key"].decode(): r for r in records}
    assert sorted(by_key) == sorted(c.idempotency_key for c in changes)
    assert len(by_key) == 4  # the replay's key is not the live change's
    by_seq = {
        orjson.loads(r.value)["seq"]: r for r in records if not orjson.loads(r.value)["replay"]
    }
    assert sorted(by_seq) == [11, 12, 13]
    for change in changes:
        record = by_key[change.idempotency_key]
        assert record.key == change.task_id.encode()
        assert orjson.loads(record.value) == change.summary()
        assert orjson.loads(record.value)["idempotencyKey"] == change.idempotency_key
        assert_no_credentials(record.value)
        assert dict(record.headers) == {
            "idempotency-key": change.idempotency_key.encode(),
            "phasewatch.kind": change.kind.encode(),
            "phasewatch.phase": change.phase.encode(),
            "phasewatch.seq": str(change.seq).encode(),
        }
    # Keyed by task id: one task's changes share a partition, in order.
    task_a = [by_seq[11], by_seq[12]]
    assert task_a[0].partition == task_a[1].partition
    assert task_a[0].offset < task_a[1].offset


def test_filters_and_checks() -> None:
    sub = kafka_publish("t", {"bootstrap_servers": "127.0.0.1:9"}, phases=["failed"])
    assert sub.name == "kafka-publish"
    assert sub.phases == {"failed"}
    assert sub.matches(make_change(phase="failed"))
    assert not sub.matches(make_change(phase="completed"))
    with pytest.raises(ValueError, match="topic"):
        kafka_publish(" ", {"bootstrap_servers": "127.0.0.1:9"})
    with pytest.raises(ValueError, match="bootstrap_servers"):
        kafka_publish("t", {})
