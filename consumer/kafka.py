"""Kafka: the consumer-group source, its dead-letter topic, and the webhook forwarder.
The only module that imports aiokafka.

At-least-once delivery, effectively-once effects. Auto-commit is off. A batch from
``getmany`` goes to the store raw (:meth:`Store.ingest_raw`): its events are decoded,
folded and committed, and the records that do not decode come back as rejected. Those
are produced to the dead-letter topic, and only then are the batch's offsets committed.
A crash anywhere before the offset commit redelivers the batch; the history
deduplicates by event id and the fold is idempotent, so the redelivery changes nothing
and records no second phase change.

Both cores do the decoding and folding: this process takes the records of a share of
the tasks (``kafka_fold_here``, by record key) and hands the store plans to write
(``decode_here``), and the store's writer process decodes and folds the others. So a
batch is up to two store transactions, one per side, each all or nothing, both before
the offset commit.

Three stages overlap: while one batch is decoded, folded and committed by the store (in
its writer process, by default), the next is fetched, and the offsets of the previous
one are committed to Kafka. At most two batches wait in the store's queue, and offset
commits run one at a time, in batch order, never past a batch that is not stored.
Rebalances: the listener waits for the batches in flight and their offset commits, so
partitions are only given up after their offsets are committed.

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
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from consumer.codec import DecodeError, Event, decode
from consumer.collector import tune_for_batches
from consumer.ingest import ChangeSink, now_ms
from consumer.secrets import redact_text
from consumer.settings import Settings
from consumer.store import ChangeRecord, Outcome, RawIngestResult, Rejected, Store, decode_all

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
    refolded: int = 0  # batches whose plan went stale: see consumer.sqlite_planner
    lag: dict[str, int] = field(default_factory=dict)  # "topic[partition]" -> records behind

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "batches": self.batches,
            "poison": self.poison,
            "duplicates": self.duplicates,
            "commitFailures": self.commit_failures,
            "storeRetries": self.store_retries,
            "refolded": self.refolded,
            "lag": dict(self.lag),
            "totalLag": sum(self.lag.values()),
        }


_MAX_INFLIGHT = 2


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Wait for the batch in flight: it commits its own offsets before we give up.
        async with self._source.batch_lock:
            await self._source.drain()
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
        self._fold_here = round(settings.kafka_fold_here * 1000)  # per mille of the keys
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

    async def start(self) -> None:
        # Batches are decoded and folded in this process (decode_here below).
        tune_for_batches()
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
        self._task.add_done_callback(self._run_ended)

    def _run_ended(self, task: asyncio.Task[None]) -> None:
        # The loop only ends on stop(); anything else is a fault (a bug, or an error
        # this module does not expect): say so loudly, and let /readyz say so, rather
        # than stop consuming in silence.
        if task.cancelled() or (exc := task.exception()) is None:
            return
        self.failure = redact_text(f"{type(exc).__name__}: {exc}")[:500]
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
        await self.drain()
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
            "failed": self.failure,
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
            records = [record for batch in data.values() for record in batch]
            offsets = {tp: batch[-1].offset + 1 for tp, batch in data.items()}
            # Fetch the next batch while this one is decoded, folded and stored: the
            # backend decodes (the default one in its writer process), so this loop stays
            # free to fetch and to feed the writer.
            async with self.batch_lock:
                # Two batches in the store's queue: the writer starts the next as soon as
                # it commits one, without waiting for this loop's turn.
                while len(self._inflight) >= _MAX_INFLIGHT:
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
        while result is None:
            try:
                result = await self._ingest(records)
            except Exception:
                if self._stopping.is_set():
                    return False  # offsets not committed: the next owner gets it again
                self.stats.store_retries += 1
                log.exception("store could not commit a batch of %d; retrying", len(records))
                await asyncio.sleep(self._backoff)
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
        """Store a batch, splitting the decoding and folding between this process and
        the store's writer (``kafka_fold_here``) by record key: the key is the task id,
        so a task is always folded on the same side, and this side's plans stay right.
        (A record keyed otherwise is still folded correctly, only more slowly: see
        :mod:`consumer.sqlite_planner`.)"""
        here: list[int] = []
        there: list[int] = []
        for i, record in enumerate(records):
            key = record.key
            fold_here = key is not None and zlib.crc32(key) % 1000 < self._fold_here
            (here if fold_here else there).append(i)
        received = now_ms()
        parts = [
            (
                positions,
                self._store.ingest_raw(
                    [records[i].value or b"" for i in positions],
                    "kafka",
                    received,
                    decode_here=decode_here,
                ),
            )
            for positions, decode_here in ((here, True), (there, False))
            if positions
        ]
        results = await asyncio.gather(*(call for _, call in parts))
        self.stats.refolded += sum(result.refolded for result in results)
        if len(results) == 1:
            return results[0]
        outcomes: list[Outcome | Rejected] = [Outcome.DUPLICATE] * len(records)
        changes: list[ChangeRecord] = []
        for (positions, _), result in zip(parts, results, strict=True):
            for i, outcome in zip(positions, result.outcomes, strict=True):
                outcomes[i] = outcome
            changes.extend(result.changes)
        changes.sort(key=lambda c: c.seq)
        return RawIngestResult(outcomes, changes)

    async def _commit_stored(self, consumer: AIOKafkaConsumer) -> None:
        while self._stored:
            offsets, self._stored = self._stored, {}
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

    async def _dead_letter(self, poison: Sequence[tuple[ConsumerRecord, Rejected]]) -> None:
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
                await asyncio.sleep(self._backoff)
        self.stats.poison += len(poison)
        for record, why in poison:
            log.warning(
                "poison record %s[%d]@%d -> DLQ: %s",
                record.topic,
                record.partition,
                record.offset,
                why.reason,
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

    async def submit(self, raw: bytes) -> str | Rejected:
        if self._producer is None:
            raise RuntimeError("KafkaForwarder is not started")
        # Bad input is the sender's to hear about, not the topic's.
        events, rejected = decode_all([raw])
        if rejected:
            return rejected[0]
        event = events[0]
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


# --------------------------------------------------------------------------------------------
# Replay: re-read a time window of the topics into the store, outside the consumer group.
# --------------------------------------------------------------------------------------------

REPLAY_SOURCE = "kafka-replay"
_REPLAY_CHECKPOINT_EVERY_S = 1.0  # bounds the re-reading after a hard kill
_POISON_SAMPLES = 20  # poison records described in the stats; the count is always exact


@dataclass(slots=True)
class ReplayStats:
    """What one ``replay_topics`` run did (this run only; a resumed run starts from zero)."""

    partitions: int = 0  # partitions of the topics
    records: int = 0  # records inside the window, decoded or not
    accepted: int = 0  # new to the store
    duplicates: int = 0  # already in the store (overlap with what the live consumer had)
    poison: int = 0  # records in the window that do not decode (left where they are)
    outside: int = 0  # records read but outside [since, until] (timestamps out of order)
    batches: int = 0
    resumed: bool = False  # started from a saved checkpoint
    interrupted: bool = False  # stopped early; the checkpoint is saved
    poison_samples: list[str] = field(default_factory=list)  # "topic[p]@offset: reason"


@dataclass(slots=True)
class _Span:
    """One partition's share of the replay: read offsets [next, end)."""

    next: int  # next offset to read (also what the checkpoint keeps)
    end: int  # end offset taken at the start of the run: records after it are not read
    first: int  # ``next`` at the start of this run, for progress
    done: bool = False


def replay_checkpoint_key(topic: str, since_ms: int, until_ms: int | None) -> str:
    """Meta key of a replay's checkpoint: the same window of the same topic resumes."""
    return f"kafka-replay:{topic}:{since_ms}:{'-' if until_ms is None else until_ms}"


async def replay_topics(
    settings: Settings,
    store: Store,
    since_ms: int,
    until_ms: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    *,
    topics: Sequence[str] | None = None,
    batch_size: int | None = None,
    stop: asyncio.Event | None = None,
    on_batch: Callable[[int], None] | None = None,
    fire_handlers: bool = False,
) -> ReplayStats:
    """Fold the records of ``topics`` (default: the configured ones) whose timestamp is in
    ``[since_ms, until_ms]`` into the store, source ``"kafka-replay"``. Phase changes go
    to the outbox (and so to live handlers) only with ``fire_handlers``: recovering old
    history should not re-notify the past (``replay handlers`` does that on purpose).

    Never touches the live consumer group: partitions are assigned manually, with no group
    id and no commits, so the running service's offsets and membership are unaffected.
    Each partition starts at ``offsets_for_times(since)`` and stops at its end offset as
    taken at the start (records produced meanwhile are the live consumer's business), or at
    its first record stamped after ``until``: like ``offsets_for_times`` itself, this relies
    on timestamps growing along a partition, which holds for LogAppendTime and for
    producers that stamp records when they send them. A stray record before ``since`` past
    the start offset is skipped and counted in ``outside``.

    Ingesting is idempotent, so overlapping what the store already has is harmless. Poison
    records are counted, not dead-lettered: the live consumer already sent them to the DLQ.
    After each committed batch (at most once a second, and always when stopped) the next
    offset of every partition is saved in the store's meta table, per topic and window; a
    re-run with the same window resumes from there, and the note is deleted when done.
    ``stop`` (or ``KeyboardInterrupt`` raised by ``on_batch``) ends the run after the batch
    in flight. Progress is counted in offsets.
    """
    if since_ms < 0:
        raise ValueError("since must not be before 1970 (offsets_for_times takes ms >= 0)")
    names = list(topics) if topics else settings.topics()
    limit = batch_size or settings.kafka_max_batch
    consumer: AIOKafkaConsumer | None = None
    try:
        partitions = await _partitions(settings, names)
        consumer = AIOKafkaConsumer(
            **client_options(settings),
            group_id=None,  # no group: nothing to join, nothing that could commit
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a checkpoint older than retention: oldest kept
        )
        await consumer.start()
    except KafkaError as exc:
        if consumer is not None:
            await consumer.stop()
        raise ConnectionError(
            f"cannot reach the Kafka brokers at {settings.kafka_bootstrap_servers}: {exc}"
        ) from exc
    try:
        spans, stats = await _replay_plan(consumer, store, partitions, since_ms, until_ms)
        replay = _Replay(consumer, store, spans, stats, (since_ms, until_ms))
        replay.fire_handlers = fire_handlers
        await replay.run(limit, progress, stop, on_batch)
    finally:
        await consumer.stop()
    return stats


async def _partitions(settings: Settings, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics``. Asked of an admin client: the consumer's metadata
    only covers topics it already tracks, and a metadata request naming a missing topic
    would create it on brokers that auto-create; listing the topics first never does."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        missing = set(topics) - set(await admin.list_topics())
        if missing:
            raise ValueError(f"no such topic on the brokers: {', '.join(sorted(missing))}")
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    partitions: list[TopicPartition] = []
    for topic in described:
        if topic["error_code"]:
            raise ValueError(f"topic {topic['topic']!r}: error code {topic['error_code']}")
        ids = sorted(p["partition"] for p in topic["partitions"])
        partitions.extend(TopicPartition(topic["topic"], p) for p in ids)
    return partitions


async def _replay_plan(
    consumer: AIOKafkaConsumer,
    store: Store,
    partitions: list[TopicPartition],
    since_ms: int,
    until_ms: int | None,
) -> tuple[dict[TopicPartition, _Span], ReplayStats]:
    topics = sorted({tp.topic for tp in partitions})
    ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    saved: dict[str, dict[str, Any]] = {}
    for topic in topics:
        note = await store.get_meta(replay_checkpoint_key(topic, since_ms, until_ms))
        saved[topic] = orjson.loads(note) if note is not None else {}
    stats = ReplayStats(partitions=len(partitions), resumed=any(saved.values()))
    lookup = {tp: since_ms for tp in partitions if str(tp.partition) not in saved[tp.topic]}
    found: dict[TopicPartition, Any] = await consumer.offsets_for_times(lookup) if lookup else {}
    spans: dict[TopicPartition, _Span] = {}
    for tp in partitions:
        end = ends[tp]
        mark = saved[tp.topic].get(str(tp.partition))
        if mark is not None:
            start, done = int(mark["next"]), bool(mark["done"])
        else:
            # None: no record at or after since in this partition.
            hit = found.get(tp)
            start, done = (end if hit is None else hit.offset), False
        spans[tp] = _Span(start, end, start, done or start >= end)
    return spans, stats


class _Replay:
    """One run's state: the spans, the stats, and when the checkpoint was last saved."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        store: Store,
        spans: dict[TopicPartition, _Span],
        stats: ReplayStats,
        window: tuple[int, int | None],
    ) -> None:
        self.consumer = consumer
        self.store = store
        self.spans = spans
        self.stats = stats
        self.since_ms, self.until_ms = window
        self.active = [tp for tp, span in spans.items() if not span.done]
        self._counted = [spans[tp] for tp in self.active]  # the progress is over these
        self.total = sum(s.end - s.first for s in self._counted)
        self._saved_at = time.monotonic()
        self.fire_handlers = False

    async def run(
        self,
        limit: int,
        progress: Callable[[int, int | None], None] | None,
        stop: asyncio.Event | None,
        on_batch: Callable[[int], None] | None,
    ) -> None:
        if progress is not None:
            progress(0, self.total)
        if self.active:
            self.consumer.assign(self.active)
            for tp in self.active:
                self.consumer.seek(tp, self.spans[tp].next)
        while self.active:
            fetched = await self._step(limit)
            stopping = stop is not None and stop.is_set()
            if on_batch is not None and fetched:
                try:
                    on_batch(self.stats.batches)
                except KeyboardInterrupt:
                    stopping = True
            if progress is not None:
                progress(self.done(), self.total)
            if stopping and self.active:
                self.stats.interrupted = True
                await self.save()
                return
            if time.monotonic() - self._saved_at >= _REPLAY_CHECKPOINT_EVERY_S:
                await self.save()
        for topic in {tp.topic for tp in self.spans}:
            key = replay_checkpoint_key(topic, self.since_ms, self.until_ms)
            await self.store.set_meta(key, None)

    async def _step(self, limit: int) -> bool:
        """Fetch once and commit what is in the window; False when nothing came back."""
        try:
            data = await self.consumer.getmany(timeout_ms=500, max_records=limit)
        except KafkaError as exc:
            log.warning("replay fetch failed (%s); retrying", exc)
            await asyncio.sleep(0.5)
            return False
        events = _replay_batch(data, self.spans, self.stats, self.since_ms, self.until_ms)
        if not data:
            # A partition whose last offsets are transaction markers or were compacted
            # away has no record left to show that it reached its end offset.
            for tp in self.active:
                position = await self.consumer.position(tp)
                if position >= self.spans[tp].end:
                    self.spans[tp].next, self.spans[tp].done = position, True
        finished = [tp for tp in self.active if self.spans[tp].done]
        if finished:
            self.consumer.pause(*finished)  # no more fetches for them
            self.active = [tp for tp in self.active if not self.spans[tp].done]
        if events:
            result = await self.store.ingest(
                events, REPLAY_SOURCE, now_ms(), record_changes=self.fire_handlers
            )
            self.stats.accepted += sum(1 for o in result.outcomes if o == "accepted")
            self.stats.duplicates += sum(1 for o in result.outcomes if o == "duplicate")
        if data:
            self.stats.batches += 1
        return bool(data)

    def done(self) -> int:
        """Offsets behind us in this run; a partition that passed ``until`` early counts
        as read to its end, so the rate and ETA stay honest."""
        return sum((s.end if s.done else s.next) - s.first for s in self._counted)

    async def save(self) -> None:
        by_topic: dict[str, dict[str, dict[str, Any]]] = {}
        for tp, span in self.spans.items():
            by_topic.setdefault(tp.topic, {})[str(tp.partition)] = {
                "next": span.next,
                "done": span.done,
            }
        for topic, marks in by_topic.items():
            key = replay_checkpoint_key(topic, self.since_ms, self.until_ms)
            await self.store.set_meta(key, orjson.dumps(marks).decode())
        self._saved_at = time.monotonic()


def _replay_batch(
    data: dict[TopicPartition, list[ConsumerRecord]],
    spans: dict[TopicPartition, _Span],
    stats: ReplayStats,
    since_ms: int,
    until_ms: int | None,
) -> list[Event]:
    """Decode the records of one fetch that fall in the window, advancing the spans."""
    events: list[Event] = []
    for tp, records in data.items():
        span = spans[tp]
        for record in records:
            if span.done:
                break
            if record.offset >= span.end:
                span.done = True  # produced after the replay started
                break
            span.next = record.offset + 1
            if until_ms is not None and record.timestamp > until_ms:
                span.done = True  # past the window: the rest of the partition is later
                break
            if record.timestamp < since_ms:
                stats.outside += 1
                continue
            stats.records += 1
            try:
                events.append(decode(record.value or b""))
            except DecodeError as exc:
                stats.poison += 1
                if len(stats.poison_samples) < _POISON_SAMPLES:
                    stats.poison_samples.append(
                        f"{_tp_name(tp)}@{record.offset}: {exc.reason}: {str(exc)[:200]}"
                    )
        if span.next >= span.end:
            span.done = True
    return events


__all__ += ["REPLAY_SOURCE", "ReplayStats", "replay_checkpoint_key", "replay_topics"]
