"""webhook.receive -> store.commit -> handler.deliver, in-process on a real SQLite store:
the spans, their parents and links, what the receipt and the handlers are given, the
notifier's traceparent, and no secret or body in any attribute."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from typing import Any

import pytest
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from consumer import tracing
from consumer.core.change import PhaseChange
from consumer.core.signature import sign
from consumer.dispatch.subscription import Subscription
from handlers import http_notify
from tests.handlers.conftest import Answer, Receiver
from tests.http.conftest import PATH, MakeClient
from tests.support import FIXTURE_SECRET, snapshot, wait_until, webhook_body
from tests.tracing.conftest import traced

NOTIFY_SECRET = "whsec_" + base64.b64encode(b"tracing-receiver-secret").decode()
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
INCOMING = f"00-{TRACE_ID}-{PARENT_ID}-01"
# Planted in the task: it must reach no attribute (nor the notification body).
CREDENTIAL = "s3+https://AKIAPLANTED:SECRETPLANTED@s3.example/bucket"
PARAMS = {"transcode-file": {"storage": {"url": CREDENTIAL}}}

# Every attribute any span may carry: anything else is a leak waiting to happen.
ALLOWED = {
    "http.request.method",
    "http.route",
    "http.response.status_code",
    "phasewatch.outcome",
    "phasewatch.event.id",
    "phasewatch.event.type",
    "phasewatch.task.id",
    "phasewatch.webhook.verified_by",
    "phasewatch.source",
    "phasewatch.batch.size",
    "phasewatch.batch.accepted",
    "phasewatch.batch.duplicates",
    "phasewatch.batch.rejected",
    "phasewatch.changes",
    "phasewatch.handler",
    "phasewatch.change.seq",
    "phasewatch.change.kind",
    "phasewatch.change.phase",
    "phasewatch.delivery.attempt",
    "error.type",
}


def signed(body: bytes) -> dict[str, str]:
    return {"Livepeer-Signature": sign(FIXTURE_SECRET, body, int(time.time() * 1000))}


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def ids(span: ReadableSpan) -> tuple[int, int]:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.trace_id, ctx.span_id


def assert_clean(spans: Iterable[ReadableSpan], *secrets: str | bytes) -> None:
    """No attribute outside the allowed names; no secret, credential or body in any value
    (span attributes, link attributes, events, status descriptions)."""
    values: list[str] = []
    for span in spans:
        attributes = dict(span.attributes or {})
        assert set(attributes) <= ALLOWED, set(attributes) - ALLOWED
        values.extend(str(v) for v in attributes.values())
        for link in span.links:
            values.extend(str(v) for v in (link.attributes or {}).values())
        for event in span.events:
            values.append(event.name)
            values.extend(str(v) for v in (event.attributes or {}).values())
        values.append(span.status.description or "")
    text = "\n".join(values)
    for secret in (*secrets, "AKIAPLANTED", "SECRETPLANTED", FIXTURE_SECRET, NOTIFY_SECRET):
        shown = secret.decode() if isinstance(secret, bytes) else secret
        assert shown not in text
    assert all(len(v) <= 256 for v in values)
    assert "{" not in text  # no body, nor any JSON of it


class Recorder:
    """A handler that keeps what it was given, and the span current where it ran."""

    def __init__(self) -> None:
        self.seen: list[tuple[PhaseChange, int]] = []

    async def __call__(self, change: PhaseChange) -> None:
        self.seen.append((change, trace.get_current_span().get_span_context().span_id))

    def subscription(self) -> Subscription:
        return Subscription(name="record", fn=self)


async def _post(client: Any, body: bytes, headers: Any) -> int:
    response = await client.post(PATH, data=body, headers=headers)
    await response.read()
    return int(response.status)


async def test_incoming_traceparent_continues_through_commit_to_delivery(
    make_client: MakeClient, receiver: Receiver, spans: InMemorySpanExporter
) -> None:
    recorder = Recorder()
    notifier = http_notify(receiver.url("/hook"), NOTIFY_SECRET)
    client, service = await make_client(handlers=[notifier, recorder.subscription()])
    body = webhook_body("ev-1", snapshot("task-1", "completed", 5, params=PARAMS))
    headers = {**signed(body), "traceparent": INCOMING, "tracestate": "vendor=abc"}
    assert await _post(client, body, headers) == 200

    await wait_until(lambda: len(traced(spans, "handler.deliver")) == 2, "both deliveries")
    (receive,) = traced(spans, "webhook.receive")
    commits = traced(spans, "store.commit")
    deliveries = {
        str((s.attributes or {})["phasewatch.handler"]): s for s in traced(spans, "handler.deliver")
    }
    assert set(deliveries) == {"http-notify", "record"}

    # webhook.receive: a server span, the child of the sender's span.
    assert receive.kind is SpanKind.SERVER
    assert receive.parent is not None and receive.parent.is_remote
    assert f"{receive.parent.trace_id:032x}" == TRACE_ID
    assert f"{receive.parent.span_id:016x}" == PARENT_ID
    assert f"{ids(receive)[0]:032x}" == TRACE_ID
    assert receive.get_span_context().trace_state.get("vendor") == "abc"  # type: ignore[union-attr]
    assert dict(receive.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/webhooks/livepeer",
        "http.response.status_code": 200,
        "phasewatch.outcome": "accepted",
        "phasewatch.event.id": "ev-1",
        "phasewatch.event.type": "task.updated",
        "phasewatch.task.id": "task-1",
        "phasewatch.webhook.verified_by": "0",
    }
    assert receive.status.status_code is StatusCode.UNSET

    # store.commit: its own trace, linked to the request it carried.
    (commit,) = [c for c in commits if ids(receive) in [ids_of(link) for link in c.links]]
    assert commit.parent is None
    assert ids(commit)[0] != ids(receive)[0]
    attributes = dict(commit.attributes or {})
    assert attributes["phasewatch.source"] == "webhook"
    assert attributes["phasewatch.outcome"] == "committed"
    assert attributes["phasewatch.batch.size"] == 1
    assert attributes["phasewatch.batch.accepted"] == 1
    assert attributes["phasewatch.changes"] == 1

    # handler.deliver: children of webhook.receive, in the sender's trace.
    for name, delivery in deliveries.items():
        assert delivery.parent is not None, name
        assert (delivery.parent.trace_id, delivery.parent.span_id) == ids(receive)
        assert dict(delivery.attributes or {}) == {
            "phasewatch.handler": name,
            "phasewatch.task.id": "task-1",
            "phasewatch.event.id": "ev-1",
            "phasewatch.change.seq": 1,
            "phasewatch.change.kind": "phase",
            "phasewatch.change.phase": "completed",
            "phasewatch.delivery.attempt": 1,
            "phasewatch.outcome": "ok",
        }

    # The receipt, and so the stored change, keep webhook.receive's context (not the
    # sender's); the handler ran inside its handler.deliver span, and was given that
    # span's context to continue.
    (entry,) = await service.store.history_after(0, task_id="task-1")
    assert entry.receipt is not None
    assert entry.receipt.traceparent == traceparent_of(receive)
    (record,) = await service.store.changes_after(0)
    assert record.traceparent == traceparent_of(receive)
    ((change, current),) = recorder.seen
    assert current == ids(deliveries["record"])[1]
    assert change.traceparent == traceparent_of(deliveries["record"])

    # The notification carries the notifier's handler.deliver context.
    (request,) = receiver.received
    assert request.headers["traceparent"] == traceparent_of(deliveries["http-notify"])
    # The history keeps the traceparent only: tracestate stops at webhook.receive.
    assert "tracestate" not in request.headers
    assert b"traceparent" not in request.body  # the body is the same on every attempt
    assert_clean(spans.get_finished_spans(), headers["Livepeer-Signature"], body)


def ids_of(link: Any) -> tuple[int, int]:
    return link.context.trace_id, link.context.span_id


async def test_each_attempt_is_a_span_and_sends_its_own_traceparent(
    make_client: MakeClient, receiver: Receiver, spans: InMemorySpanExporter
) -> None:
    receiver.answer(Answer(503, "busy"), Answer(200))
    notifier = http_notify(receiver.url("/hook"), NOTIFY_SECRET, backoff_s=0.01, max_backoff_s=0.02)
    client, _ = await make_client(handlers=[notifier])
    body = webhook_body("ev-r", snapshot("task-r", "failed", 7, params=PARAMS))
    assert await _post(client, body, {**signed(body), "traceparent": INCOMING}) == 200

    await wait_until(lambda: len(traced(spans, "handler.deliver")) == 2, "two attempts")
    (receive,) = traced(spans, "webhook.receive")
    first, second = traced(spans, "handler.deliver")
    assert [s.attributes["phasewatch.delivery.attempt"] for s in (first, second)] == [1, 2]  # type: ignore[index]
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["phasewatch.outcome"] == "error"
    assert first.attributes["error.type"] == "NotifyError"
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "error"  # never the message (it quotes the answer)
    assert second.attributes["phasewatch.outcome"] == "ok"
    for attempt in (first, second):
        assert attempt.parent is not None
        assert (attempt.parent.trace_id, attempt.parent.span_id) == ids(receive)
    assert [r.headers["traceparent"] for r in receiver.received] == [
        traceparent_of(first),
        traceparent_of(second),
    ]
    assert_clean(spans.get_finished_spans(), body, "busy")


async def test_without_a_traceparent_the_webhook_starts_the_trace(
    make_client: MakeClient, spans: InMemorySpanExporter
) -> None:
    recorder = Recorder()
    client, service = await make_client(handlers=[recorder.subscription()])
    body = webhook_body("ev-2", snapshot("task-2", "running", 3))
    assert await _post(client, body, signed(body)) == 200
    await wait_until(lambda: traced(spans, "handler.deliver"), "the delivery")
    (receive,) = traced(spans, "webhook.receive")
    (delivery,) = traced(spans, "handler.deliver")
    assert receive.parent is None
    assert delivery.parent is not None
    assert (delivery.parent.trace_id, delivery.parent.span_id) == ids(receive)
    ((change, _),) = recorder.seen
    assert change.traceparent == traceparent_of(delivery)
    (record,) = await service.store.changes_after(0)
    assert record.traceparent == traceparent_of(receive)


async def test_several_or_invalid_traceparents_are_not_continued(
    make_client: MakeClient, spans: InMemorySpanExporter
) -> None:
    client, _ = await make_client(handlers=[])
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    for n, extra in enumerate(
        [
            [("traceparent", INCOMING), ("traceparent", other)],
            [("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01")],  # an all-zero parent id
            [("traceparent", "garbage")],
        ]
    ):
        body = webhook_body(f"ev-x{n}", snapshot(f"task-x{n}", "running", 3))
        headers = CIMultiDict([*signed(body).items(), *extra])
        assert await _post(client, body, headers) == 200
    receives = traced(spans, "webhook.receive")
    assert len(receives) == 3
    assert all(s.parent is None for s in receives)


async def test_refused_webhooks_are_spans_with_their_outcome_and_no_identity(
    make_client: MakeClient, spans: InMemorySpanExporter
) -> None:
    client, _ = await make_client(handlers=[])
    body = webhook_body("ev-3", snapshot("task-3", "running", 3, params=PARAMS))
    forged = {"Livepeer-Signature": sign(b"not-the-secret", body, int(time.time() * 1000))}
    assert await _post(client, body, {**forged, "traceparent": INCOMING}) == 401
    unusable = webhook_body("ev-4", {"id": "task-4", "status": {"updatedAt": 1}})
    assert await _post(client, unusable, signed(unusable)) == 422
    bad, rejected = traced(spans, "webhook.receive")
    assert dict(bad.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/webhooks/livepeer",
        "http.response.status_code": 401,
        "phasewatch.outcome": "bad_signature",
    }
    assert bad.status.status_code is StatusCode.UNSET  # the sender's fault, not ours
    assert bad.parent is not None and f"{bad.parent.trace_id:032x}" == TRACE_ID
    assert rejected.attributes is not None
    assert rejected.attributes["http.response.status_code"] == 422
    assert rejected.attributes["phasewatch.event.id"] == "ev-4"
    (commit,) = traced(spans, "store.commit")
    assert commit.attributes is not None and commit.attributes["phasewatch.batch.rejected"] == 1
    assert_clean(spans.get_finished_spans(), forged["Livepeer-Signature"], body, unusable)


async def test_a_store_that_cannot_commit_gives_failed_commit_and_503_spans(
    make_client: MakeClient, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, service = await make_client(handlers=[])

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("database or disk is full")

    monkeypatch.setattr(service.store, "ingest_raw", broken)
    body = webhook_body("ev-5", snapshot("task-5", "running", 3))
    assert await _post(client, body, signed(body)) == 503
    (receive,) = traced(spans, "webhook.receive")
    (commit,) = traced(spans, "store.commit")
    assert receive.status.status_code is StatusCode.ERROR
    assert receive.attributes is not None
    assert receive.attributes["phasewatch.outcome"] == "store_unavailable"
    assert commit.attributes is not None
    assert commit.attributes["phasewatch.outcome"] == "failed"
    assert commit.attributes["error.type"] == "OSError"
    assert commit.status.status_code is StatusCode.ERROR
    assert "disk" not in (commit.status.description or "")


async def test_without_tracing_the_incoming_traceparent_travels_as_before(
    make_client: MakeClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.configure() is False
    assert not tracing.enabled()
    recorder = Recorder()
    notifier = http_notify(receiver.url("/hook"), NOTIFY_SECRET)
    client, service = await make_client(handlers=[notifier, recorder.subscription()])
    body = webhook_body("ev-6", snapshot("task-6", "completed", 5))
    assert await _post(client, body, {**signed(body), "traceparent": INCOMING}) == 200
    await wait_until(lambda: recorder.seen and receiver.received, "both handlers")
    ((change, current),) = recorder.seen
    assert change.traceparent == INCOMING  # the request's own, as stored
    assert current == 0  # no span anywhere
    (entry,) = await service.store.history_after(0, task_id="task-6")
    assert entry.receipt is not None and entry.receipt.traceparent == INCOMING
    assert receiver.received[0].headers["traceparent"] == INCOMING
    assert "tracestate" not in receiver.received[0].headers
    # No traceparent in, none out.
    body = webhook_body("ev-7", snapshot("task-7", "completed", 5))
    assert await _post(client, body, signed(body)) == 200
    await wait_until(lambda: len(receiver.received) == 2, "the second notification")
    assert "traceparent" not in receiver.received[1].headers
