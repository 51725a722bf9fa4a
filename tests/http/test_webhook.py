"""The webhook receiver end to end, in-process: signatures, status codes, the fixtures
through the real HTTP path, and handlers fed from committed changes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from consumer.core.change import PhaseChange
from consumer.core.secrets import MARKER, redact
from consumer.core.signature import sign
from consumer.dispatch.subscription import Subscription
from consumer.store.memory import MemoryStore
from tests.http.conftest import PATH, MakeClient
from tests.support import (
    FIXTURE_SECRET,
    CrossLoopEvent,
    Delivery,
    deliveries,
    expected_changes,
    expected_tasks,
    snapshot,
    wait_until,
    webhook_body,
)


async def post(client: TestClient[Any, Any], d: Delivery) -> int:
    response = await client.post(PATH, data=d.body, headers={"Livepeer-Signature": d.signature})
    await response.read()
    return response.status


def signed(body: bytes, secret: bytes = FIXTURE_SECRET, t: int | None = None) -> dict[str, str]:
    return {
        "Livepeer-Signature": sign(secret, body, t if t is not None else int(time.time() * 1000))
    }


@pytest.mark.parametrize("fixture", ["small", "messy"])
async def test_fixture_through_http_gives_expected_tasks(
    make_client: MakeClient, fixture: str
) -> None:
    client, _ = await make_client()
    stream = deliveries(fixture)
    limit = asyncio.Semaphore(32)

    async def send(d: Delivery) -> int:
        async with limit:
            return await post(client, d)

    statuses = await asyncio.gather(*(send(d) for d in stream))
    assert set(statuses) == {200}
    for task_id, task in expected_tasks(fixture).items():
        response = await client.get(f"/tasks/{task_id}")
        assert response.status == 200
        assert await response.json() == redact(task)
    listed = await client.get("/tasks", params={"limit": "1000"})
    assert len((await listed.json())["tasks"]) == len(expected_tasks(fixture))


async def test_small_in_order_handlers_see_expected_changes(make_client: MakeClient) -> None:
    seen: dict[str, list[list[str | None]]] = {}

    async def record(change: PhaseChange) -> None:
        seen.setdefault(change.task_id, []).append([change.previous_phase, change.phase])
        assert change.task.id == change.task_id and change.task.phase == change.phase

    client, service = await make_client(handlers=[Subscription(name="record", fn=record)])
    for d in sorted(deliveries("small"), key=Delivery.order_key):
        assert await post(client, d) == 200
    expected = expected_changes("small")
    total = sum(len(v) for v in expected.values())
    await wait_until(lambda: sum(len(v) for v in seen.values()) >= total, "every change")

    async def settled() -> bool:
        # Nothing more can arrive once the handler's cursor covers the whole outbox.
        last = (await service.store.stats()).last_change_seq
        cursor = service.dispatcher.status()["handlers"]["record"]["cursor"]
        return bool(cursor == last and service.dispatcher.pending(last) == 0)

    await wait_until(settled, "the handler to resolve the whole outbox")
    assert seen == expected
    assert (await (await client.get("/readyz")).json())["pendingChanges"] == 0


async def test_duplicate_is_acknowledged_again(make_client: MakeClient) -> None:
    client, _ = await make_client()
    d = deliveries("small")[0]
    first = await client.post(PATH, data=d.body, headers={"Livepeer-Signature": d.signature})
    second = await client.post(PATH, data=d.body, headers={"Livepeer-Signature": d.signature})
    assert (first.status, second.status) == (200, 200)
    assert (await first.json())["status"] == "accepted"
    assert (await second.json())["status"] == "duplicate"


async def test_non_task_events_are_acknowledged_and_kept(make_client: MakeClient) -> None:
    client, service = await make_client()
    body = orjson.dumps(
        {
            "id": "as-1",
            "createdAt": 1,
            "timestamp": 2,
            "event": "asset.ready",
            "payload": {"asset": {"id": "A", "snapshot": {"id": "A"}}},
        }
    )
    response = await client.post(PATH, data=body, headers=signed(body))
    assert response.status == 200
    stats = await service.store.stats()
    assert (stats.events, stats.tasks) == (1, 0)


BAD_INPUT = [
    # (name, body, headers-maker, status, error code)
    ("not json", b"{nope", "sign", 400, "not_json"),
    ("json array", b"[1,2,3]", "sign", 400, "not_json"),
    ("not an envelope", b'{"hello":"world"}', "sign", 400, "not_an_event"),
    (
        "no phase",
        webhook_body("x1", {"id": "T", "status": {"updatedAt": 1}}),
        "sign",
        422,
        "invalid_event",
    ),
    (
        "text updatedAt",
        webhook_body(
            "x2", {"id": "T", "status": {"phase": "running", "updatedAt": "soon"}}, created_at=1
        ),
        "sign",
        422,
        "invalid_event",
    ),
    (
        "missing signature",
        webhook_body("x3", snapshot("T", "running", 1)),
        "none",
        401,
        "bad_signature",
    ),
    (
        "malformed signature",
        webhook_body("x4", snapshot("T", "running", 1)),
        "garbage",
        401,
        "bad_signature",
    ),
    (
        "wrong secret",
        webhook_body("x5", snapshot("T", "running", 1)),
        "wrong",
        401,
        "bad_signature",
    ),
    (
        "stale timestamp",
        webhook_body("x6", snapshot("T", "running", 1)),
        "stale",
        401,
        "bad_signature",
    ),
]


def headers_for(kind: str, body: bytes) -> dict[str, str]:
    now = int(time.time() * 1000)
    return {
        "sign": signed(body, t=now),
        "none": {},
        "garbage": {"Livepeer-Signature": "v2=whatever"},
        "wrong": signed(body, b"not-the-secret", t=now),
        "stale": signed(body, t=now - 3_600_000),
    }[kind]


@pytest.mark.parametrize(
    ("name", "body", "how", "status", "code"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT]
)
async def test_bad_input_gets_a_clear_4xx(
    make_client: MakeClient, name: str, body: bytes, how: str, status: int, code: str
) -> None:
    client, service = await make_client(webhook_tolerance_s=300)
    response = await client.post(PATH, data=body, headers=headers_for(how, body))
    assert response.status == status, name
    payload = await response.json()
    assert payload["error"] == code and payload["message"]
    assert (await service.store.stats()).events == 0  # never half-applied


async def test_oversized_body_is_413(make_client: MakeClient) -> None:
    client, service = await make_client(webhook_max_body_bytes=1024)
    body = webhook_body("big", snapshot("T", "running", 1, pad="x" * 2000))
    response = await client.post(PATH, data=body, headers=signed(body))
    assert response.status == 413
    assert (await response.json())["error"] == "too_large"

    async def chunks() -> Any:  # no Content-Length: the limit applies while reading
        for i in range(0, len(body), 256):
            yield body[i : i + 256]

    response = await client.post(PATH, data=chunks(), headers=signed(body))
    assert response.status == 413
    assert (await service.store.stats()).events == 0


async def test_barrage_of_bad_input_leaves_service_healthy_and_data_intact(
    make_client: MakeClient,
) -> None:
    client, _ = await make_client(webhook_tolerance_s=300, webhook_max_body_bytes=4096)
    good = list(deliveries("small")[:60])
    bad: list[tuple[bytes, dict[str, str]]] = []
    for _, body, how, _, _ in BAD_INPUT:
        bad.extend([(body, headers_for(how, body))] * 5)
    bad.append((b"x" * 10_000, {}))
    bad.append((b"\x00\xff" * 100, headers_for("sign", b"\x00\xff" * 100)))

    async def send_bad(body: bytes, headers: dict[str, str]) -> int:
        r = await client.post(PATH, data=body, headers=headers)
        await r.read()
        return r.status

    # The good ones are fixtures from 2025: re-sign them now, the window is on.
    async def send_good(d: Delivery) -> int:
        r = await client.post(PATH, data=d.body, headers=signed(d.body))
        await r.read()
        return r.status

    results = await asyncio.gather(*(send_bad(b, h) for b, h in bad), *(send_good(d) for d in good))
    assert all(400 <= s < 500 for s in results[: len(bad)])
    assert set(results[len(bad) :]) == {200}
    assert (await client.get("/healthz")).status == 200
    ready = await (await client.get("/readyz")).json()
    assert ready["events"] == len({d.doc["id"] for d in good})
    # Every signed body that is not a usable event was counted, and nothing else was.
    undecodable = 5 * sum(1 for *_, status, _ in BAD_INPUT if status in (400, 422)) + 1
    assert ready["ingest"]["rejected"] == undecodable


async def test_unsigned_webhooks_accepted_when_no_secret(make_client: MakeClient) -> None:
    client, _ = await make_client(webhook_secret=None)
    body = webhook_body("u1", snapshot("T", "pending", 1))
    assert (await client.post(PATH, data=body)).status == 200


async def test_store_failure_is_503_not_4xx(make_client: MakeClient) -> None:
    class BrokenStore(MemoryStore):
        async def ingest(self, *args: Any, **kwargs: Any) -> Any:
            raise OSError("disk on fire")

    client, _ = await make_client(store=BrokenStore())
    body = webhook_body("b1", snapshot("T", "pending", 1))
    response = await client.post(PATH, data=body, headers=signed(body))
    assert response.status == 503
    assert (await response.json())["error"] == "store_unavailable"


async def test_failing_and_slow_handlers_never_affect_ingestion(make_client: MakeClient) -> None:
    calls: list[str] = []

    async def boom(change: PhaseChange) -> None:
        raise RuntimeError("handler bug")

    async def slow(change: PhaseChange) -> None:
        await asyncio.sleep(3600)

    held = CrossLoopEvent()
    release = CrossLoopEvent()

    async def holding(change: PhaseChange) -> None:
        held.set()
        await release.wait()

    async def ok(change: PhaseChange) -> None:
        calls.append(change.task_id)

    client, service = await make_client(
        handlers=[
            Subscription(name="boom", fn=boom, max_attempts=1),
            Subscription(name="slow", fn=slow, max_attempts=1, timeout_s=0.2),
            Subscription(name="ok", fn=ok),
            Subscription(name="holding", fn=holding, max_attempts=1, timeout_s=3600),
        ],
    )

    async def send(i: int) -> int:
        body = webhook_body(f"h{i}", snapshot(f"T{i}", "pending", 1))
        return (await client.post(PATH, data=body, headers=signed(body))).status

    assert await asyncio.wait_for(send(0), 30) == 200
    await wait_until(held.is_set, "the holding handler to get the first change")
    # Acknowledged while a handler still holds a change: the receiver never waits for one
    # (if it did, these posts would hang until the guard below fails).
    statuses = await asyncio.wait_for(asyncio.gather(send(1), send(2)), 30)
    assert list(statuses) == [200, 200]
    assert not release.is_set()
    await wait_until(lambda: len(calls) == 3, "the ok handler's three calls")
    assert calls == ["T0", "T1", "T2"]

    def dead(name: str) -> int:
        return int(service.dispatcher.status()["handlers"][name]["dead"])

    await wait_until(lambda: dead("boom") == 3 and dead("slow") == 3, "three dead letters each")
    release.set()


async def test_handlers_receive_no_credentials(make_client: MakeClient) -> None:
    got: list[PhaseChange] = []

    async def grab(change: PhaseChange) -> None:
        got.append(change)

    client, _ = await make_client(handlers=[Subscription(name="grab", fn=grab)])
    snap = snapshot(
        "S",
        "waiting",
        5,
        params={
            "transcode-file": {"storage": {"url": "s3+https://AK:SK@h/b"}},
            "upload": {"encryption": {"encryptedKey": "SECRETKEY"}},
        },
    )
    body = webhook_body("s1", snap)
    assert (await client.post(PATH, data=body, headers=signed(body))).status == 200
    await wait_until(lambda: len(got) == 1, "the change to reach the handler")
    dumped = orjson.dumps(got[0].task.wire()).decode()
    assert "SK@" not in dumped and "SECRETKEY" not in dumped and MARKER in dumped


async def test_readyz_is_503_when_kafka_consumption_stopped(make_client: MakeClient) -> None:
    client, service = await make_client()
    ready = await client.get("/readyz")
    assert ready.status == 200

    class StoppedSource:
        async def stop(self) -> None:
            pass

        def status(self) -> dict[str, Any]:
            return {
                "records": 7,
                "poison": 0,
                "commitFailures": 0,
                "lag": {},
                "failed": "RuntimeError: the dispatcher is broken",
            }

    service.kafka = StoppedSource()  # type: ignore[assignment]
    stopped = await client.get("/readyz")
    assert stopped.status == 503
    body = await stopped.json()
    assert body["error"] == "kafka_stopped" and "dispatcher is broken" in body["message"]
    assert body["kafka"]["records"] == 7  # the figures are still there to look at
