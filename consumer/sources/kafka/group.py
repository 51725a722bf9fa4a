"""Kafka's consumer-group source and its dead-letter topic.

At-least-once delivery, effectively-once effects. Auto-commit is off. A batch from
``getmany`` goes to the store raw, with its record keys (:meth:`IngestStore.ingest_raw`):
its events are decoded, folded and committed, and the records that do not decode come
back as rejected. Those are produced to the dead-letter topic, and only then are the
batch's offsets committed. A crash anywhere before the offset commit redelivers the
batch; the history deduplicates by event id and the fold is idempotent, so the
redelivery changes nothing and records no second phase change.

How the store spreads the decoding, folding and writing (the SQLite backend over two
processes, by record key) is the store's business: this module hands it batches.

Three stages overlap: while one batch is decoded, folded and committed by the store, the
next is fetched, and the offsets of the previous one are committed to Kafka. At most
``store.pipeline_depth`` batches wait in the store, and offset commits run one at a
time, in batch order, never past a batch that is not stored. Rebalances: the listener
waits for the batches in flight and their offset commits, so partitions are only given
up after their offsets are committed.

If the store cannot commit, the batch is retried with backoff and its offsets are not
committed: the partition waits for the store rather than skipping data. Poison records
(not JSON, not an event, an unusable task) never wait: they go to ``<topic>.dlq`` with the
reason in headers.

Topics that do not exist yet (brokers with ``auto.create.topics.enable=false``, the norm
in production) are named in one warning at start; the member still joins its group, with
no partitions, and is ready. The consumer refreshes its metadata every
``metadata_max_age_s`` (aiokafka's default is 5 minutes), so a topic created later is
consumed within seconds: the group leader sees it, the group rebalances and the new
partitions are assigned. An INFO line says when it appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from consumer.core.backoff import Backoff, Retries
from consumer.core.secrets import describe_error
from consumer.core.times import now_ms
from consumer.sources.group_commit import ChangeSink
from consumer.sources.kafka.options import (
    BrokersUnreachable,
    KafkaConnection,
    SourceOptions,
    client_options,
    partition_name,
)
from consumer.store.base import IngestStore, RawIngestResult, Rejected

__all__ = ["KafkaSource", "KafkaStats"]

log = logging.getLogger(__name__)

# Waits for the store, the brokers or the DLQ: short at first (a blip), capped low so that
# a partition resumes within seconds of the fault clearing.
STORE_BACKOFF = Backoff(0.1, 5.0)
# How often the consumer's own (cached) metadata is looked at for a topic that was missing
# at start: no request to the brokers, only to log when it appears.
TOPIC_CHECK_S = 0.5


@dataclass(slots=True)
class KafkaStats:
    records: int = 0
    batches: int = 0
    poison: int = 0
    duplicates: int = 0
    commit_failures: int = 0
    store_retries: int = 0
    store_failing: str | None = None  # why the batch being retried does not commit
    lag: dict[str, int] = field(default_factory=dict)  # "topic[partition]" -> records behind

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "batches": self.batches,
            "poison": self.poison,
            "duplicates": self.duplicates,
            "commitFailures": self.commit_failures,
            "storeRetries": self.store_retries,
            "storeFailing": self.store_failing,
            "lag": dict(self.lag),
            "totalLag": sum(self.lag.values()),
        }


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Wait for the batch in flight: it commits its own offsets before we give up.
        async with self._source.batch_lock:
            await self._source.drain()
            for tp in revoked:
                self._source.stats.lag.pop(partition_name(tp), None)
        self._source.left_group()
        log.info("partitions revoked: %s", sorted(partition_name(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        # Called after every join, with an empty set too: a group may have more members
        # than partitions, and such a member is still a member (and ready).
        self._source.joined_group()
        log.info("partitions assigned: %s", sorted(partition_name(tp) for tp in assigned))


class KafkaSource:
    """Consume the configured topics in a consumer group into the store."""

    def __init__(
        self,
        store: IngestStore,
        connection: KafkaConnection,
        options: SourceOptions,
        *,
        on_changes: ChangeSink | None = None,
        backoff: Backoff = STORE_BACKOFF,
    ) -> None:
        self._store = store
        self._connection = connection
        self._options = options
        self._on_changes = on_changes
        self._backoff = backoff
        self._topics = list(options.topics)
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        # Batches handed to the store, oldest first. Each resolves True once stored (and
        # only if every batch before it was stored too).
        self._inflight: deque[asyncio.Task[bool]] = deque()
        # Offsets whose records are stored but not yet committed to Kafka, and the task
        # committing them: the next batch goes to the store without waiting for the
        # broker's round trip, and commits coalesce while one is under way.
        self._stored: dict[TopicPartition, int] = {}
        self._committer: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.batch_lock = asyncio.Lock()
        self.stats = KafkaStats()
        self.failure: str | None = None  # why consumption stopped, if it did by itself
        self._out_since: float | None = time.monotonic()  # not in the group since
        self._missing: list[str] = []  # configured topics the brokers did not have yet
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        options = client_options(self._connection)
        self._dlq = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)
        self._consumer = AIOKafkaConsumer(
            **options,
            group_id=self._options.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self._options.max_batch,
            metadata_max_age_ms=max(1, round(self._options.metadata_max_age_s * 1000)),
        )
        try:
            await self._dlq.start()
            await self._consumer.start()
        except KafkaError as exc:
            await self._dlq.stop()
            await self._consumer.stop()
            raise BrokersUnreachable(
                f"cannot reach the brokers at {self._connection.bootstrap_servers}: {exc}"
            ) from exc
        await self._note_missing_topics(self._consumer)
        self._consumer.subscribe(self._topics, listener=_Listener(self))
        self._task = asyncio.create_task(self._run(), name="kafka-source")
        self._task.add_done_callback(self._run_ended)

    async def _note_missing_topics(self, consumer: AIOKafkaConsumer) -> None:
        """Warn about the configured topics the brokers do not have, and watch for them."""
        try:
            existing = await consumer.topics()
        except KafkaError as exc:  # only the warning is lost: consumption works the same
            log.warning("could not list the topics to check the configured ones (%s)", exc)
            return
        self._missing = [topic for topic in self._topics if topic not in existing]
        if not self._missing:
            return
        log.warning(
            "waiting for topic%s %s to be created: not on the brokers yet; consumed within "
            "about %g s of its creation (PHASEWATCH_KAFKA_METADATA_MAX_AGE_S)",
            "s" if len(self._missing) > 1 else "",
            ", ".join(self._missing),
            self._options.metadata_max_age_s,
        )
        self._watcher = asyncio.create_task(self._watch_topics(consumer), name="kafka-topics")

    async def _watch_topics(self, consumer: AIOKafkaConsumer) -> None:
        while self._missing:
            await asyncio.sleep(TOPIC_CHECK_S)
            for topic in list(self._missing):
                partitions = consumer.partitions_for_topic(topic)
                if partitions:
                    self._missing.remove(topic)
                    log.info(
                        "topic %s was created (%d partitions): consuming it",
                        topic,
                        len(partitions),
                        extra={"topic": topic},
                    )

    def _run_ended(self, task: asyncio.Task[None]) -> None:
        # The loop only ends on stop(); anything else is a fault (a bug, or an error
        # this module does not expect): say so loudly, and let /readyz say so, rather
        # than stop consuming in silence.
        if task.cancelled() or (exc := task.exception()) is None:
            return
        self.failure = describe_error(exc)
        log.critical("Kafka consumption stopped: %s", self.failure, exc_info=exc)

    async def stop(self) -> None:
        """Finish the batch in flight (its offsets committed), then leave the group."""
        self._stopping.set()
        if self._task is not None:
            async with self.batch_lock:
                self._task.cancel()
            # A loop that failed was reported when it did (_run_ended).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self.drain()
        if self._consumer is not None:
            await self._consumer.stop()  # leaves the group: partitions move at once
        if self._dlq is not None:
            await self._dlq.stop()

    def joined_group(self) -> None:
        self._out_since = None

    def left_group(self) -> None:
        self._out_since = time.monotonic()

    def status(self) -> dict[str, Any]:
        assigned = self._consumer.assignment() if self._consumer is not None else set()
        out_s = None if self._out_since is None else time.monotonic() - self._out_since
        return {
            "topics": self._topics,
            # Configured but not created yet: not a readiness failure (the member is in
            # its group, with no partitions of them).
            "missingTopics": list(self._missing),
            "group": self._options.group_id,
            "assigned": sorted(partition_name(tp) for tp in assigned),
            "joined": out_s is None,
            # Out of the group past the grace period: /readyz answers 503.
            "joinOverdue": out_s is not None and out_s > self._options.join_grace_s,
            "failed": self.failure,
            **self.stats.as_dict(),
        }

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        fetches = Retries(self._backoff)
        while not self._stopping.is_set():
            try:
                data = await consumer.getmany(timeout_ms=500, max_records=self._options.max_batch)
            except KafkaError as exc:
                log.warning("fetch failed (%s); retrying", exc)
                await asyncio.sleep(fetches.failed())
                continue
            fetches.succeeded()
            if not data:
                continue
            records = [record for batch in data.values() for record in batch]
            offsets = {tp: batch[-1].offset + 1 for tp, batch in data.items()}
            # Fetch the next batch while this one is decoded, folded and stored: the
            # backend decodes, so this loop stays free to fetch and to feed it.
            async with self.batch_lock:
                # As many batches in the store as it can use (its pipeline depth): a
                # writer of its own starts the next as soon as it commits one, without
                # waiting for this loop's turn.
                while len(self._inflight) >= max(1, self._store.pipeline_depth):
                    await self._settle_oldest()
                previous = self._inflight[-1] if self._inflight else None
                self._inflight.append(
                    asyncio.create_task(
                        self._store_and_commit(consumer, records, offsets, previous)
                    )
                )

    async def _settle_oldest(self) -> None:
        oldest = self._inflight[0]
        try:
            await asyncio.shield(oldest)
        finally:
            if self._inflight and self._inflight[0] is oldest:
                self._inflight.popleft()

    async def _stored_inflight(self) -> None:
        """Wait until the batches in flight are stored (offsets may still be committing).
        A batch that failed already stopped the fetch loop; its offsets stay uncommitted
        and the partition's next owner gets it again."""
        batches = list(self._inflight)
        self._inflight.clear()
        if batches:
            await asyncio.wait(batches)
        for batch in batches:
            if not batch.cancelled() and (exc := batch.exception()) is not None:
                log.error("batch failed, offsets left uncommitted: %r", exc)

    async def drain(self) -> None:
        """Wait until the batch in flight is stored and its offsets committed."""
        await self._stored_inflight()
        if self._committer is not None:
            try:
                await asyncio.shield(self._committer)
            finally:
                self._committer = None

    async def _store_and_commit(
        self,
        consumer: AIOKafkaConsumer,
        records: list[ConsumerRecord],
        offsets: dict[TopicPartition, int],
        previous: asyncio.Task[bool] | None,
    ) -> bool:
        result = None
        retries = Retries(self._backoff)
        while result is None:
            try:
                result = await self._ingest(records)
            except Exception as exc:
                if self._stopping.is_set():
                    return False  # offsets not committed: the next owner gets it again
                self.stats.store_retries += 1
                self.stats.store_failing = describe_error(exc)
                log.exception("store could not commit a batch of %d; retrying", len(records))
                await asyncio.sleep(retries.failed())
        self.stats.store_failing = None
        # Offsets are committed in batch order: never past a batch that is not stored.
        if previous is not None and not await previous:
            return False
        # The dead letters must be durable before their offsets are committed.
        await self._dead_letter([(records[i], why) for i, why in result.rejected])
        self.stats.records += len(records)
        self.stats.batches += 1
        self.stats.duplicates += sum(1 for o in result.outcomes if o == "duplicate")
        if result.changes and self._on_changes is not None:
            self._on_changes(result.changes)
        self._stored.update(offsets)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_stored(consumer))
        return True

    async def _ingest(self, records: list[ConsumerRecord]) -> RawIngestResult:
        """Store a batch. The record keys go along: they are the task ids, and a backend
        may spread its work by them (the SQLite writer process does, see
        :mod:`consumer.store.sqlite.process`)."""
        return await self._store.ingest_raw(
            [record.value or b"" for record in records],
            "kafka",
            now_ms(),
            keys=[record.key for record in records],
        )

    async def _commit_stored(self, consumer: AIOKafkaConsumer) -> None:
        while self._stored:
            offsets, self._stored = self._stored, {}
            await self._commit(consumer, offsets)
            for tp, position in offsets.items():
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    self.stats.lag[partition_name(tp)] = max(0, highwater - position)

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # Harmless for correctness: whoever reads these records next finds them in
            # the history. Happens when a rebalance or a broker outage beats us to it.
            self.stats.commit_failures += 1
            log.warning("offset commit failed (%s); records will be redelivered", exc)

    async def _dead_letter(self, poison: Sequence[tuple[ConsumerRecord, Rejected]]) -> None:
        if not poison:
            return
        assert self._dlq is not None
        retries = Retries(self._backoff)
        while True:
            try:
                sends = [
                    await self._dlq.send(
                        f"{record.topic}{self._options.dlq_suffix}",
                        value=record.value,
                        key=record.key,
                        headers=[
                            ("phasewatch.reason", why.reason.encode()),
                            ("phasewatch.error", why.message[:1000].encode()),
                            ("phasewatch.topic", record.topic.encode()),
                            ("phasewatch.partition", str(record.partition).encode()),
                            ("phasewatch.offset", str(record.offset).encode()),
                        ],
                    )
                    for record, why in poison
                ]
                await asyncio.gather(*sends)
                break
            except KafkaError as produce_error:
                log.warning("dead-letter produce failed (%s); retrying", produce_error)
                await asyncio.sleep(retries.failed())
        self.stats.poison += len(poison)
        for record, why in poison:
            log.warning(
                "poison record %s[%d]@%d -> DLQ: %s",
                record.topic,
                record.partition,
                record.offset,
                why.reason,
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                },
            )
