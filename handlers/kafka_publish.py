"""The built-in Kafka publisher: each change as one record on a topic.

Record key: the task id, so one task's changes stay in order in one partition. Value:
the change's :meth:`~consumer.PhaseChange.summary` as compact JSON (credentials already
hidden), ``idempotencyKey`` included. Headers: ``idempotency-key`` (the change's
:attr:`~consumer.PhaseChange.idempotency_key`), ``phasewatch.kind`` (``phase`` or
``update``), ``phasewatch.phase`` and ``phasewatch.seq``, so consumers can route and
deduplicate without parsing the value; and ``traceparent``, the change's
:attr:`~consumer.PhaseChange.traceparent` when it has one (with tracing on, see
:mod:`consumer.tracing`, the context of this attempt's ``handler.deliver`` span).

The producer (:class:`consumer.KafkaPublisher`: ``acks=all``, idempotent) is started by
the subscription's ``on_start`` and stopped by ``on_stop``; a call returns once the
broker has the record, so a failure is retried by the dispatcher. A retry after a lost
acknowledgement, or a redelivery after a crash, can write the record twice: consumers
deduplicate by the ``idempotency-key`` header, which (unlike ``phasewatch.seq``) is the
same whichever replica publishes it and after the store is rebuilt from an export, and
differs for a replayed change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from consumer import DeliveryPolicy, KafkaPublisher, PhaseChange, Subscription
from handlers.subscribe import DEFAULT_POLICY, phase_set, subscription, type_set

__all__ = ["kafka_publish"]

log = logging.getLogger(__name__)


class _Publisher:
    def __init__(self, topic: str, options: Mapping[str, Any]) -> None:
        # A copy: the caller's dict (which may hold a SASL password) is not kept or logged.
        self._publisher = KafkaPublisher(dict(options))
        self._topic = topic
        self._started = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._started:
                return
            try:
                await self._publisher.start()
            except BaseException:
                # A producer whose start failed still holds sockets and tasks.
                with contextlib.suppress(Exception):
                    await self._publisher.stop()
                raise
            self._started = True

    async def stop(self) -> None:
        async with self._lock:
            self._started = False
            await self._publisher.stop()

    async def __call__(self, change: PhaseChange) -> None:
        if not self._started:
            # Normally started by on_start; starting here also recovers from a broker that
            # was unreachable when the service started.
            await self.start()
        headers = [
            ("idempotency-key", change.idempotency_key.encode()),
            ("phasewatch.kind", change.kind.encode()),
            ("phasewatch.phase", change.phase.encode()),
            ("phasewatch.seq", str(change.seq).encode()),
        ]
        if change.traceparent is not None:
            headers.append(("traceparent", change.traceparent.encode()))
        await self._publisher.publish(
            self._topic,
            orjson.dumps(change.summary()),
            key=change.task_id.encode(),
            headers=headers,
        )
        log.debug("published seq %d of task %s to %s", change.seq, change.task_id, self._topic)


def kafka_publish(
    topic: str,
    options: Mapping[str, Any],
    *,
    phases: str | Iterable[str] = (),
    types: str | Iterable[str] = (),
    updates: bool = False,
    name: str = "kafka-publish",
    concurrency: int = DEFAULT_POLICY.concurrency,
    timeout_s: float = DEFAULT_POLICY.timeout_s,
    max_attempts: int = DEFAULT_POLICY.max_attempts,
    max_age_s: float = DEFAULT_POLICY.max_age_s,
    backoff_s: float = DEFAULT_POLICY.backoff_s,
    max_backoff_s: float = DEFAULT_POLICY.max_backoff_s,
) -> Subscription:
    """A subscription producing each matching change to ``topic``.

    ``options``: aiokafka client options, usually
    ``consumer.client_options(settings.kafka_connection())``
    (bootstrap servers and security). ``phases``/``types``: only these (empty: all).
    """
    if not isinstance(topic, str) or not topic.strip():
        raise ValueError(f"{name}: the topic must be a non-empty string, got {topic!r}")
    if not options.get("bootstrap_servers"):
        raise ValueError(f"{name}: options must include bootstrap_servers")
    publisher = _Publisher(topic, options)
    return subscription(
        publisher,
        name=name,
        phases=phase_set(phases, what="phases"),
        types=type_set(types, what="types"),
        updates=updates,
        policy=DeliveryPolicy(
            concurrency=concurrency,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            max_age_s=max_age_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        ),
        on_start=publisher.start,
        on_stop=publisher.stop,
        extra={"topic": topic},
    )
