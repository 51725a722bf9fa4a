"""Replay a time window of Kafka topics into the store, outside the consumer group:
recovery from the brokers by timestamp (``phasewatch replay kafka``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from consumer.core.backoff import Backoff, Retries
from consumer.core.codec import DecodeError, Event, decode
from consumer.core.times import now_ms
from consumer.replay.job import Checkpoint, Job
from consumer.sources.kafka.options import KafkaConnection, client_options, partition_name
from consumer.store.base import IngestStore, MetaStore

__all__ = [
    "REPLAY_SOURCE",
    "ReplayStats",
    "ReplayTarget",
    "replay_checkpoint_key",
    "replay_topics",
]

log = logging.getLogger(__name__)

REPLAY_SOURCE = "kafka-replay"
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


class ReplayTarget(IngestStore, MetaStore, Protocol):
    """What a Kafka replay needs of the store: to ingest, and to keep its checkpoint."""


def _checkpoint(store: MetaStore, topic: str, since_ms: int, until_ms: int | None) -> Checkpoint:
    # Saved at most once a second: bounds the re-reading after a hard kill.
    return Checkpoint(store, replay_checkpoint_key(topic, since_ms, until_ms), every_s=1.0)


async def replay_topics(
    connection: KafkaConnection,
    topics: Sequence[str],
    store: ReplayTarget,
    since_ms: int,
    until_ms: int | None = None,
    *,
    batch_size: int = 2000,
    job: Job | None = None,
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
    A long job (:mod:`consumer.replay.job`): stopping ends the run after the batch in
    flight. Progress is counted in offsets.
    """
    if since_ms < 0:
        raise ValueError("since must not be before 1970 (offsets_for_times takes ms >= 0)")
    names = list(topics)
    limit = batch_size
    consumer: AIOKafkaConsumer | None = None
    try:
        partitions = await _partitions(connection, names)
        consumer = AIOKafkaConsumer(
            **client_options(connection),
            group_id=None,  # no group: nothing to join, nothing that could commit
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a checkpoint older than retention: oldest kept
        )
        await consumer.start()
    except KafkaError as exc:
        if consumer is not None:
            await consumer.stop()
        raise ConnectionError(
            f"cannot reach the Kafka brokers at {connection.bootstrap_servers}: {exc}"
        ) from exc
    try:
        spans, stats = await _replay_plan(consumer, store, partitions, since_ms, until_ms)
        replay = _Replay(consumer, store, spans, stats, (since_ms, until_ms))
        replay.fire_handlers = fire_handlers
        await replay.run(limit, job or Job())
    finally:
        await consumer.stop()
    return stats


async def _partitions(connection: KafkaConnection, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics``. Asked of an admin client: the consumer's metadata
    only covers topics it already tracks, and a metadata request naming a missing topic
    would create it on brokers that auto-create; listing the topics first never does."""
    admin = AIOKafkaAdminClient(**client_options(connection))
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
    store: ReplayTarget,
    partitions: list[TopicPartition],
    since_ms: int,
    until_ms: int | None,
) -> tuple[dict[TopicPartition, _Span], ReplayStats]:
    topics = sorted({tp.topic for tp in partitions})
    ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    saved: dict[str, dict[str, Any]] = {}
    for topic in topics:
        note = await _checkpoint(store, topic, since_ms, until_ms).load()
        saved[topic] = note or {}
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
        store: ReplayTarget,
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
        self._checkpoints = {
            topic: _checkpoint(store, topic, self.since_ms, self.until_ms)
            for topic in {tp.topic for tp in spans}
        }
        self._fetches = Retries(Backoff(0.1, 5.0))
        self.fire_handlers = False

    async def run(self, limit: int, job: Job) -> None:
        job.report(0, self.total)
        if self.active:
            self.consumer.assign(self.active)
            for tp in self.active:
                self.consumer.seek(tp, self.spans[tp].next)
        while self.active:
            fetched = await self._step(limit)
            stopping = job.batch_done() if fetched else job.stopping
            job.report(self.done(), self.total)
            if stopping and self.active:
                self.stats.interrupted = True
                await self.save(force=True)
                return
            await self.save()
        for checkpoint in self._checkpoints.values():
            await checkpoint.clear()

    async def _step(self, limit: int) -> bool:
        """Fetch once and commit what is in the window; False when nothing came back."""
        try:
            data = await self.consumer.getmany(timeout_ms=500, max_records=limit)
        except KafkaError as exc:
            log.warning("replay fetch failed (%s); retrying", exc)
            await asyncio.sleep(self._fetches.failed())
            return False
        self._fetches.succeeded()
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

    async def save(self, *, force: bool = False) -> None:
        by_topic: dict[str, dict[str, dict[str, Any]]] = {}
        for tp, span in self.spans.items():
            by_topic.setdefault(tp.topic, {})[str(tp.partition)] = {
                "next": span.next,
                "done": span.done,
            }
        for topic, marks in by_topic.items():
            await self._checkpoints[topic].save(marks, force=force)


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
                        f"{partition_name(tp)}@{record.offset}: {exc.reason}: {str(exc)[:200]}"
                    )
        if span.next >= span.end:
            span.done = True
    return events
