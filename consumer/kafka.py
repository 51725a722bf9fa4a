"""Kafka: the consumer-group source, its dead-letter topic, and the webhook forwarder.
The only module that imports aiokafka.

At-least-once delivery, effectively-once effects. Auto-commit is off. A batch from
``getmany`` is decoded, its poison records are produced to the dead-letter topic, the
rest is folded and committed to the store in one transaction, and only then are the
batch's offsets committed. A crash anywhere before the offset commit redelivers the batch;
the history deduplicates by event id and the fold is idempotent, so the redelivery changes
nothing and records no second phase change.

Rebalances: batch processing holds a lock that the rebalance listener also takes, so
partitions are only given up between batches, after their offsets are committed.

If the store cannot commit, the batch is retried with backoff and its offsets are not
committed: the partition waits for the store rather than skipping data. Poison records
(not JSON, not an event, an unusable task) never wait: they go to ``<topic>.dlq`` with the
reason in headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from consumer.codec import DecodeError, Event, decode
from consumer.ingest import ChangeSink, now_ms
from consumer.settings import Settings
from consumer.store import Store

__all__ = ["KafkaForwarder", "KafkaPublisher", "KafkaSource", "KafkaStats", "client_options"]

log = logging.getLogger(__name__)


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by consumers and producers (security included)."""
    if not settings.kafka_bootstrap_servers:
        raise ValueError("kafka_bootstrap_servers is not set")
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
        )
        options["ssl_context"] = context
    if settings.kafka_sasl_mechanism:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        password = settings.kafka_sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


@dataclass(slots=True)
class KafkaStats:
    records: int = 0
    batches: int = 0
    poison: int = 0
    duplicates: int = 0
    commit_failures: int = 0
    store_retries: int = 0
    lag: dict[str, int] = field(default_factory=dict)  # "topic[partition]" -> records behind

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "batches": self.batches,
            "poison": self.poison,
            "duplicates": self.duplicates,
            "commitFailures": self.commit_failures,
            "storeRetries": self.store_retries,
            "lag": dict(self.lag),
            "totalLag": sum(self.lag.values()),
        }


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Wait for the batch in flight: it commits its own offsets before releasing.
        async with self._source.batch_lock:
            for tp in revoked:
                self._source.stats.lag.pop(_tp_name(tp), None)
        log.info("partitions revoked: %s", sorted(_tp_name(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", sorted(_tp_name(tp) for tp in assigned))


class KafkaSource:
    """Consume the configured topics in a consumer group into the store."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        on_changes: ChangeSink | None = None,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self._store = store
        self._settings = settings
        self._on_changes = on_changes
        self._backoff = retry_backoff_s
        self._topics = settings.topics()
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.batch_lock = asyncio.Lock()
        self.stats = KafkaStats()

    async def start(self) -> None:
        options = client_options(self._settings)
        self._dlq = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)
        self._consumer = AIOKafkaConsumer(
            **options,
            group_id=self._settings.kafka_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self._settings.kafka_max_batch,
        )
        await self._dlq.start()
        await self._consumer.start()
        self._consumer.subscribe(self._topics, listener=_Listener(self))
        self._task = asyncio.create_task(self._run(), name="kafka-source")

    async def stop(self) -> None:
        """Finish the batch in flight (its offsets committed), then leave the group."""
        self._stopping.set()
        if self._task is not None:
            async with self.batch_lock:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()  # leaves the group: partitions move at once
        if self._dlq is not None:
            await self._dlq.stop()

    def status(self) -> dict[str, Any]:
        assigned = self._consumer.assignment() if self._consumer is not None else set()
        return {
            "topics": self._topics,
            "group": self._settings.kafka_group_id,
            "assigned": sorted(_tp_name(tp) for tp in assigned),
            **self.stats.as_dict(),
        }

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping.is_set():
            try:
                data = await consumer.getmany(
                    timeout_ms=500, max_records=self._settings.kafka_max_batch
                )
            except KafkaError as exc:
                log.warning("fetch failed (%s); retrying", exc)
                await asyncio.sleep(self._backoff)
                continue
            if not data:
                continue
            async with self.batch_lock:
                await self._process(consumer, data)

    async def _process(
        self, consumer: AIOKafkaConsumer, data: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        events: list[Event] = []
        poison: list[tuple[ConsumerRecord, DecodeError]] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, records in data.items():
            for record in records:
                try:
                    events.append(decode(record.value or b""))
                except DecodeError as exc:
                    poison.append((record, exc))
            offsets[tp] = records[-1].offset + 1
        # The dead letters must be durable before their offsets are committed.
        await self._dead_letter(poison)
        result = None
        while result is None:
            try:
                result = await self._store.ingest(events, "kafka", now_ms())
            except Exception:
                if self._stopping.is_set():
                    return  # offsets not committed: the next owner gets the batch again
                self.stats.store_retries += 1
                log.exception("store could not commit a batch of %d; retrying", len(events))
                await asyncio.sleep(self._backoff)
        self.stats.records += sum(len(r) for r in data.values())
        self.stats.batches += 1
        self.stats.duplicates += sum(1 for o in result.outcomes if o == "duplicate")
        if result.changes and self._on_changes is not None:
            self._on_changes(result.changes)
        await self._commit(consumer, offsets)
        for tp, position in offsets.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self.stats.lag[_tp_name(tp)] = max(0, highwater - position)

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # Harmless for correctness: whoever reads these records next finds them in
            # the history. Happens when a rebalance or a broker outage beats us to it.
            self.stats.commit_failures += 1
            log.warning("offset commit failed (%s); records will be redelivered", exc)

    async def _dead_letter(self, poison: Sequence[tuple[ConsumerRecord, DecodeError]]) -> None:
        if not poison:
            return
        assert self._dlq is not None
        while True:
            try:
                sends = [
                    await self._dlq.send(
                        f"{record.topic}{self._settings.kafka_dlq_suffix}",
                        value=record.value,
                        key=record.key,
                        headers=[
                            ("phasewatch.reason", exc.reason.encode()),
                            ("phasewatch.error", str(exc)[:1000].encode()),
                            ("phasewatch.topic", record.topic.encode()),
                            ("phasewatch.partition", str(record.partition).encode()),
                            ("phasewatch.offset", str(record.offset).encode()),
                        ],
                    )
                    for record, exc in poison
                ]
                await asyncio.gather(*sends)
                break
            except KafkaError as produce_error:
                log.warning("dead-letter produce failed (%s); retrying", produce_error)
                await asyncio.sleep(self._backoff)
        self.stats.poison += len(poison)
        for record, exc in poison:
            log.warning(
                "poison record %s[%d]@%d -> DLQ: %s",
                record.topic,
                record.partition,
                record.offset,
                exc.reason,
            )


class KafkaForwarder:
    """The webhook sink in forward mode: produce the verified raw body to the topic, keyed
    by task id, and acknowledge once the broker has it (acks=all, idempotent producer)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topic = settings.topics()[0]
        self._producer: AIOKafkaProducer | None = None
        self.forwarded = 0

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            **client_options(self._settings),
            acks="all",
            enable_idempotence=True,
            linger_ms=1,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def submit(self, event: Event) -> str:
        if self._producer is None:
            raise RuntimeError("KafkaForwarder is not started")
        key = (event.task_id or event.id).encode()
        await self._producer.send_and_wait(self._topic, value=event.raw, key=key)
        self.forwarded += 1
        return "forwarded"


class KafkaPublisher:
    """A small producer for handler code (``handlers.kafka_publish``): acks=all,
    idempotent; ``publish`` returns once the broker has the record."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            **self._options, acks="all", enable_idempotence=True, linger_ms=1
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        if self._producer is None:
            raise RuntimeError("KafkaPublisher is not started")
        await self._producer.send_and_wait(topic, value=value, key=key, headers=list(headers))


def _tp_name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"
