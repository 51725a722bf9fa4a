"""The Kafka test broker itself: real round trips, and clients surviving a broker outage.

These pin down what the rest of the Kafka tier relies on: the session broker from
``tests.kafka_fixtures`` is a real Kafka that aiokafka's idempotent producer and group
consumer work against, and the local broker can be bounced mid-test to simulate an outage.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from tests.kafka_fixtures import KafkaBroker

pytestmark = pytest.mark.kafka


def _producer(broker: KafkaBroker) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, acks="all", enable_idempotence=True
    )


def _consumer(broker: KafkaBroker, topic: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=f"pw-test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )


async def _consume(
    consumer: AIOKafkaConsumer, count: int, within: float = 30
) -> list[ConsumerRecord[Any, Any]]:
    """Exactly ``count`` records, then a short extra poll proving nothing else (no duplicates)."""
    records: list[ConsumerRecord[Any, Any]] = []
    async with asyncio.timeout(within):
        while len(records) < count:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
    extra = await consumer.getmany(timeout_ms=300)
    records.extend(r for batch in extra.values() for r in batch)
    return records


async def test_keyed_round_trip(kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    keys = [f"task-{i}".encode() for i in range(8)]
    producer = _producer(kafka_broker)
    await producer.start()
    try:
        futures = [
            await producer.send(kafka_topic, f"phase-{n}".encode(), key=keys[n % len(keys)])
            for n in range(40)
        ]
        sent = [await f for f in futures]
    finally:
        await producer.stop()

    consumer = _consumer(kafka_broker, kafka_topic)
    await consumer.start()
    try:
        records = await _consume(consumer, 40)
    finally:
        await consumer.stop()

    assert len(records) == 40
    # Keys and values arrive intact, each record where the producer was told it landed.
    landed = {(md.partition, md.offset) for md in sent}
    assert {(r.partition, r.offset) for r in records} == landed
    assert sorted(r.value for r in records) == sorted(f"phase-{n}".encode() for n in range(40))
    # Partition affinity: one partition per key, and per-key order is the send order.
    partitions_by_key: dict[bytes, set[int]] = defaultdict(set)
    values_by_key: dict[bytes, list[bytes]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        partitions_by_key[r.key].add(r.partition)
        values_by_key[r.key].append(r.value)
    assert all(len(p) == 1 for p in partitions_by_key.values())
    assert len({next(iter(p)) for p in partitions_by_key.values()}) > 1, "keys should spread"
    for i, key in enumerate(keys):
        assert values_by_key[key] == [f"phase-{n}".encode() for n in range(i, 40, len(keys))]


@pytest.mark.parametrize("outage", ["stop", "kill"])
async def test_clients_recover_from_broker_outage(
    kafka_broker: KafkaBroker, kafka_topic: str, outage: str
) -> None:
    if not kafka_broker.can_restart:
        pytest.skip(f"the {kafka_broker.kind} broker is not controlled by the tests")
    producer = _producer(kafka_broker)
    consumer = _consumer(kafka_broker, kafka_topic)
    await producer.start()
    await consumer.start()
    try:
        for n in range(10):
            await producer.send_and_wait(kafka_topic, b"before-%d" % n, key=b"k%d" % (n % 3))
        before = await _consume(consumer, 10)
        assert sorted(r.value for r in before) == sorted(b"before-%d" % n for n in range(10))
        await consumer.commit()

        # Bounce the broker from a worker thread so the clients' background tasks keep running
        # and really see connections drop, instead of a frozen event loop.
        await asyncio.to_thread(kafka_broker.stop if outage == "stop" else kafka_broker.kill)
        # Sends made while the broker is down are buffered and retried by the producer.
        pending = [
            await producer.send(kafka_topic, b"after-%d" % n, key=b"k%d" % (n % 3))
            for n in range(10)
        ]
        await asyncio.to_thread(kafka_broker.start)
        async with asyncio.timeout(60):
            await asyncio.gather(*pending)

        after = await _consume(consumer, 10, within=60)
        # Idempotence: retried batches were not written twice; the consumer resumed where it was.
        assert sorted(r.value for r in after) == sorted(b"after-%d" % n for n in range(10))
        await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
        kafka_broker.ensure_running()
