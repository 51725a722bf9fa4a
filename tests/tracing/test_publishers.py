"""The Kafka publisher's ``traceparent`` record header: the delivery span's context with
tracing on (through the in-process service), the change's stored one without, none
when the change has none. The producer is a stand-in that keeps what it was asked to
send (the real broker path is tests/handlers/test_kafka_publish.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumer.core.signature import sign
from consumer.dispatch.subscription import Subscription
from handlers import kafka_publish
from tests.handlers.support import make_change
from tests.http.conftest import PATH, MakeClient
from tests.support import FIXTURE_SECRET, snapshot, wait_until, webhook_body
from tests.tracing.conftest import traced

INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, bytes]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        self.sent.append(dict(headers))


def faked(sub: Subscription) -> FakeProducer:
    producer = FakeProducer()
    publisher: Any = sub.fn
    publisher._publisher = producer
    return producer


async def test_the_record_carries_the_changes_traceparent_or_none() -> None:
    sub = kafka_publish("t", {"bootstrap_servers": "127.0.0.1:9"})
    producer = faked(sub)
    await sub.fn(replace(make_change(), traceparent=INCOMING))
    await sub.fn(make_change(seq=8))
    with_trace, without = producer.sent
    assert with_trace["traceparent"] == INCOMING.encode()
    assert "traceparent" not in without
    assert set(without) == {
        "idempotency-key",
        "phasewatch.kind",
        "phasewatch.phase",
        "phasewatch.seq",
    }


async def test_with_tracing_the_record_carries_the_delivery_span(
    make_client: MakeClient, spans: InMemorySpanExporter
) -> None:
    sub = kafka_publish("t", {"bootstrap_servers": "127.0.0.1:9"})
    producer = faked(sub)
    client, _ = await make_client(handlers=[sub])
    body = webhook_body("ev-k", snapshot("task-k", "completed", 4))
    headers = {
        "Livepeer-Signature": sign(FIXTURE_SECRET, body, int(time.time() * 1000)),
        "traceparent": INCOMING,
    }
    assert (await client.post(PATH, data=body, headers=headers)).status == 200
    await wait_until(lambda: producer.sent and traced(spans, "handler.deliver"), "the record")
    (delivery,) = traced(spans, "handler.deliver")
    ctx = delivery.get_span_context()
    assert ctx is not None
    (record,) = producer.sent
    assert record["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01".encode()
    assert f"{ctx.trace_id:032x}" == INCOMING.split("-")[1]
