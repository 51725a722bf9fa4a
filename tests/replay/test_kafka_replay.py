"""``phasewatch replay kafka`` against the real broker: exactly the records of the window
are folded, the live group's offsets are never touched, and an interrupted replay resumes
from its saved positions without re-reading."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer.cli import replay as cli_replay
from consumer.replay.job import Job
from consumer.sources.kafka.window import replay_checkpoint_key, replay_topics
from consumer.store.sqlite.store import SQLiteStore
from tests.kafka_fixtures import KafkaBroker
from tests.replay.support import contents, meta, parse, sqlite_settings
from tests.support import snapshot, webhook_body

pytestmark = pytest.mark.kafka

RECORDS = 30
POISON = {12, 25}  # one inside the window below, one outside


def stream(t0: int) -> list[tuple[int, bytes, bytes]]:
    """(timestamp, key, value) one second apart; six tasks spread over the partitions."""
    out = []
    for i in range(RECORDS):
        task = f"task-{i % 6}"
        value = (
            b"not json at all"
            if i in POISON
            else webhook_body(f"ev-{i}", snapshot(task, "running", t0 + i * 1000))
        )
        out.append((t0 + i * 1000, task.encode(), value))
    return out


async def produce(bootstrap: str, topic: str, records: list[tuple[int, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for ts, key, value in records:  # in order, so timestamps grow along each partition
            await producer.send_and_wait(topic, value=value, key=key, timestamp_ms=ts)
    finally:
        await producer.stop()


def window_ids(first: int, last: int) -> set[str]:
    return {f"ev-{i}" for i in range(first, last + 1) if i not in POISON}


@pytest.fixture
def t0() -> int:
    # Ten minutes ago: inside any retention, and not "in the future" for brokers that
    # refuse timestamps too far ahead (Kafka 4's log.message.timestamp.after.max.ms).
    return (time.time_ns() // 1_000_000 // 1000) * 1000 - 600_000


async def test_replay_folds_exactly_the_window(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    tmp_path: Path,
    t0: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await produce(kafka_broker.bootstrap_servers, kafka_topic, stream(t0))
    db = tmp_path / "a.db"
    settings = sqlite_settings(
        db, kafka_bootstrap_servers=kafka_broker.bootstrap_servers, kafka_topics=kafka_topic
    )
    since, until = t0 + 10_000, t0 + 19_000
    args = parse("replay", "kafka", "--since", str(since), "--until", str(until))
    assert await cli_replay.run(settings, args) == 0
    _, history = await contents(db)
    assert set(history) == window_ids(10, 19)
    err = capsys.readouterr().err
    assert "10 records in the window from 3 partitions, 9 accepted, 0 duplicates, 1 poison" in err
    assert "poison " in err and "not_json" in err
    assert await meta(db, replay_checkpoint_key(kafka_topic, since, until)) is None

    # Again, overlapping what is there: nothing new; then the open-ended tail, by ISO time.
    assert await cli_replay.run(settings, args) == 0
    assert "0 accepted, 9 duplicates" in capsys.readouterr().err
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((t0 + 15_000) // 1000)) + "Z"
    tail = parse("replay", "kafka", "--since", iso, "--topic", kafka_topic)
    assert await cli_replay.run(settings, tail) == 0
    assert "9 accepted, 5 duplicates, 1 poison" in capsys.readouterr().err
    _, history = await contents(db)
    assert set(history) == window_ids(10, RECORDS - 1)
    store = SQLiteStore(db)
    await store.open()
    try:
        assert {e.source for e in await store.history_after(0, 1000)} == {"kafka-replay"}
    finally:
        await store.close()


async def test_replay_never_touches_the_live_group(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path, t0: int
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    await produce(bootstrap, kafka_topic, stream(t0))
    group = f"live-{uuid.uuid4().hex[:8]}"
    partitions = [TopicPartition(kafka_topic, p) for p in range(3)]
    live = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await live.start()
    try:
        live.assign(partitions)
        await live.commit({tp: 2 for tp in partitions})  # the service's position
    finally:
        await live.stop()

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        groups_before = {g[0] for g in await admin.list_consumer_groups()}
        before = await admin.list_consumer_group_offsets(group)
        assert {tp: o.offset for tp, o in before.items()} == dict.fromkeys(partitions, 2)

        settings = sqlite_settings(
            tmp_path / "a.db",
            kafka_bootstrap_servers=bootstrap,
            kafka_topics=kafka_topic,
            kafka_group_id=group,  # replay must not use it even though it is configured
        )
        args = parse("replay", "kafka", "--since", str(t0))
        assert await cli_replay.run(settings, args) == 0

        after = await admin.list_consumer_group_offsets(group)
        assert {tp: o.offset for tp, o in after.items()} == dict.fromkeys(partitions, 2)
        described = await admin.describe_consumer_groups([group])
        assert described[0].groups[0][5] == []  # no members: replay never joined
        new_groups = {g[0] for g in await admin.list_consumer_groups()} - groups_before
        for other in new_groups:  # no group of its own committed anything on the topic
            offsets = await admin.list_consumer_group_offsets(other)
            assert all(tp.topic != kafka_topic for tp in offsets)
    finally:
        await admin.close()
    _, history = await contents(tmp_path / "a.db")
    assert set(history) == window_ids(0, RECORDS - 1)


async def test_interrupted_replay_resumes_without_rereading(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path, t0: int
) -> None:
    await produce(kafka_broker.bootstrap_servers, kafka_topic, stream(t0))
    db = tmp_path / "a.db"
    settings = sqlite_settings(
        db, kafka_bootstrap_servers=kafka_broker.bootstrap_servers, kafka_topics=kafka_topic
    )
    since, until = t0 + 5_000, t0 + 24_000

    def interrupt_after_two(batches: int) -> None:
        if batches == 2:
            raise KeyboardInterrupt

    store = SQLiteStore(db)
    await store.open()
    try:
        first = await replay_topics(
            settings.kafka_connection(),
            settings.topics(),
            store,
            since,
            until,
            batch_size=3,
            job=Job(on_batch=interrupt_after_two),
        )
        assert first.interrupted and not first.resumed
        assert 0 < first.records < 20
        saved = await store.get_meta(replay_checkpoint_key(kafka_topic, since, until))
        assert saved is not None
        positions = orjson.loads(saved)
        assert set(positions) == {"0", "1", "2"}
        partial = {e.event_id for e in await store.history_after(0, 1000)}
        assert len(partial) < len(window_ids(5, 24))

        seen: list[int] = []
        second = await replay_topics(
            settings.kafka_connection(),
            settings.topics(),
            store,
            since,
            until,
            job=Job(on_batch=seen.append),
        )
        assert second.resumed and not second.interrupted
        # Exactly the rest: nothing of the first run was read again.
        assert first.records + second.records == 20
        assert second.duplicates == 0
        assert await store.get_meta(replay_checkpoint_key(kafka_topic, since, until)) is None
    finally:
        await store.close()
    _, history = await contents(db)
    assert set(history) == window_ids(5, 24)


async def test_interrupted_replay_through_the_cli(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    tmp_path: Path,
    t0: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await produce(kafka_broker.bootstrap_servers, kafka_topic, stream(t0))
    db = tmp_path / "a.db"
    settings = sqlite_settings(
        db, kafka_bootstrap_servers=kafka_broker.bootstrap_servers, kafka_topics=kafka_topic
    )

    def stop_at_once(batches: int) -> None:
        raise KeyboardInterrupt

    args = parse("replay", "kafka", "--since", str(t0), "--batch-size", "2")
    assert await cli_replay.run(settings, args, on_batch=stop_at_once) == 130
    assert "run the same command" in capsys.readouterr().err
    assert await cli_replay.run(settings, args) == 0
    assert "(resumed from a checkpoint)" in capsys.readouterr().err
    _, history = await contents(db)
    assert set(history) == window_ids(0, RECORDS - 1)


async def test_unknown_topic_is_an_error(
    kafka_broker: KafkaBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = sqlite_settings(
        tmp_path / "a.db", kafka_bootstrap_servers=kafka_broker.bootstrap_servers
    )
    args = parse("replay", "kafka", "--since", "0", "--topic", f"missing-{uuid.uuid4().hex}")
    assert await cli_replay.run(settings, args) == 1
    assert "no such topic" in capsys.readouterr().err
