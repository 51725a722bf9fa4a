"""Kafka producers: the webhook forwarder (forward mode) and the publisher that handler
code (``handlers.kafka_publish``) sends with. Both acks=all and idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

from consumer.core.receipt import Receipt
from consumer.sources.kafka.options import KafkaConnection, client_options
from consumer.store.base import Rejected, decode_all

__all__ = ["KafkaForwarder", "KafkaPublisher"]


class KafkaForwarder:
    """The webhook sink in forward mode: produce the verified raw body to the topic, keyed
    by task id, and acknowledge once the broker has it (acks=all, idempotent producer)."""

    def __init__(self, connection: KafkaConnection, topic: str) -> None:
        self._connection = connection
        self._topic = topic
        self._producer: AIOKafkaProducer | None = None
        self.forwarded = 0

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            **client_options(self._connection),
            acks="all",
            enable_idempotence=True,
            linger_ms=1,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def submit(self, raw: bytes, receipt: Receipt | None = None) -> str | Rejected:
        # The topic carries the body alone: a receipt does not travel in forward mode.
        del receipt
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
