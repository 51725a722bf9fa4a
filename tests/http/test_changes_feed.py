"""The changes feed in-process: ``GET /changes`` (pages, order, filters, long-poll, 400s
and 410) and ``GET /changes/stream`` (SSE: events, resume, heartbeats, filters, slow
clients, auth), on SQLite and PostgreSQL; and the feed seeing what handlers see."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import ValidationError

from consumer.api.changes import ChangeFeed, StreamConfig, decode_cursor, encode_cursor
from consumer.changes_retention import Retention, RetentionLoop, parse_retention
from consumer.core.codec import decode
from consumer.core.secrets import redact_text
from consumer.core.signature import sign
from consumer.dispatch.subscription import Subscription
from consumer.service import Service
from consumer.settings import Settings, describe_invalid
from consumer.store.base import Cursor, Store
from consumer.store.memory import MemoryStore
from consumer.store.postgres.store import PostgresStore
from consumer.store.sqlite.store import SQLiteStore
from tests.http.conftest import PATH, MakeClient
from tests.pg_fixtures import PostgresServer
from tests.support import (
    FIXTURE_SECRET,
    Delivery,
    deliveries,
    expected_changes,
    snapshot,
    wait_until,
    webhook_body,
)

FIELDS = {"cursor", "taskId", "type", "previousPhase", "phase", "changedAt", "eventId", "kind"}
Client = Any


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> Store:
    """A fresh store of each backend (opened by the service)."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("pg_server")
        server.ensure_running()
        return PostgresStore(await server.create_database(), pool_size=4)
    return SQLiteStore(tmp_path / "pw.db")


async def put(client: Client, event_id: str, snap: dict[str, Any]) -> None:
    body = webhook_body(event_id, snap)
    headers = {"Livepeer-Signature": sign(FIXTURE_SECRET, body, int(time.time() * 1000))}
    response = await client.post(PATH, data=body, headers=headers)
    assert response.status == 200, await response.text()


async def post(client: Client, d: Delivery) -> None:
    response = await client.post(PATH, data=d.body, headers={"Livepeer-Signature": d.signature})
    assert response.status == 200, await response.text()


async def get(client: Client, path: str = "/changes", **params: Any) -> tuple[int, Any]:
    response = await client.get(path, params={k: str(v) for k, v in params.items()})
    return response.status, await response.json()


async def page_all(client: Client, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        status, body = await get(client, **params)
        assert status == 200, body
        out.extend(body["changes"])
        if not body["changes"] and params.get("after") == body["next"]:
            return out
        params["after"] = body["next"]


async def outbox(service: Service) -> list[tuple[int, str, str | None, str]]:
    rows = await service.store.changes_after(0, 100_000)
    return [(c.seq, c.task_id, c.previous_phase, c.phase) for c in rows]


def per_task(changes: list[dict[str, Any]]) -> dict[str, list[list[str | None]]]:
    seen: dict[str, list[list[str | None]]] = {}
    for c in changes:
        seen.setdefault(c["taskId"], []).append([c["previousPhase"], c["phase"]])
    return seen


# -- cursors and settings -------------------------------------------------------------


def test_cursor_round_trip_and_refusals() -> None:
    for seq in (0, 1, 42, 2**63 - 1):
        assert decode_cursor(encode_cursor(seq)) == seq
    task_cursor = Cursor(5, "T").encode()
    for bad in ("", "x", "!!!!", task_cursor, encode_cursor(1) + "A", "cHcxOi0x", "a" * 41):
        with pytest.raises(ValueError, match="cursor is not one this API issued"):
            decode_cursor(bad)


def test_retention_values() -> None:
    assert parse_retention("7d") == Retention(max_age_ms=7 * 86_400_000)
    assert parse_retention("12h") == Retention(max_age_ms=12 * 3_600_000)
    assert parse_retention("30m") == Retention(max_age_ms=30 * 60_000)
    assert parse_retention("100000") == Retention(keep_last=100_000)
    assert parse_retention("0").keeps_everything
    assert parse_retention("OFF").keeps_everything
    assert Settings().changes_retention_policy() == Retention(max_age_ms=7 * 86_400_000)
    for bad in ("7 days", "-1", "1w", "d", "1.5h"):
        with pytest.raises(ValidationError) as info:
            Settings(changes_retention=bad)
        line = describe_invalid(info.value)
        assert line.startswith("PHASEWATCH_CHANGES_RETENTION: must be a time")
        assert "\n" not in line


# -- GET /changes ---------------------------------------------------------------------


async def test_pages_follow_commit_order(make_client: MakeClient, store: Store) -> None:
    client, service = await make_client(store=store)
    for d in sorted(deliveries("small"), key=Delivery.order_key):
        await post(client, d)
    changes = await page_all(client, limit=7)
    rows = await outbox(service)
    assert [decode_cursor(c["cursor"]) for c in changes] == [seq for seq, *_ in rows]
    assert all(set(c) == FIELDS and c["kind"] == "phase" for c in changes)
    assert [(c["taskId"], c["previousPhase"], c["phase"]) for c in changes] == [
        tuple(r[1:]) for r in rows
    ]
    assert per_task(changes) == expected_changes("small")
    assert all(isinstance(c["type"], str) for c in changes)
    # Without after: from the oldest retained; next of the last page stays put.
    status, first = await get(client, limit=1)
    assert status == 200 and first["changes"] == changes[:1]
    status, end = await get(client, after=changes[-1]["cursor"])
    assert (status, end) == (200, {"changes": [], "next": changes[-1]["cursor"]})
    # after=now: only what commits from here on.
    status, now = await get(client, after="now")
    assert (status, now) == (200, {"changes": [], "next": changes[-1]["cursor"]})


async def test_filters_and_next_moves_past_what_was_scanned(make_client: MakeClient) -> None:
    client, service = await make_client()
    for i in range(6):
        typ = "clip" if i % 2 else "upload"
        await put(client, f"a{i}", {**snapshot(f"T{i}", "running", 10 + i), "type": typ})
        await put(client, f"b{i}", {**snapshot(f"T{i}", "running", 20 + i), "type": typ})
        await put(client, f"c{i}", {**snapshot(f"T{i}", "completed", 30 + i), "type": typ})
    everything = await page_all(client)
    assert {c["kind"] for c in everything} == {"phase"}
    assert len(everything) == 12
    done = await page_all(client, phase="completed")
    assert [c["taskId"] for c in done] == [f"T{i}" for i in range(6)]
    clips = await page_all(client, type="clip", phase="running,completed")
    assert {c["taskId"] for c in clips} == {"T1", "T3", "T5"} and len(clips) == 6
    one = await page_all(client, taskId="T4")
    assert [(c["previousPhase"], c["phase"]) for c in one] == [
        (None, "running"),
        ("running", "completed"),
    ]
    two = await page_all(client, taskId="T4", phase="completed")
    assert len(two) == 1
    # A rare filter: each answer examined at most 10 x limit rows, and next moved past them.
    last = (await outbox(service))[-1][0]
    status, body = await get(client, phase="nope", limit=1)
    assert status == 200 and body["changes"] == []
    assert decode_cursor(body["next"]) == min(10, last)
    assert await page_all(client, phase="nope", limit=1) == []


async def test_stale_alerts_are_listed_as_kind_stale_when_asked(
    make_client: MakeClient, store: Store
) -> None:
    client, service = await make_client(store=store)
    await put(client, "s1", snapshot("S", "running", 1_000))
    recorded = await service.store.record_stale("running", 300_000, now_ms=1_000 + 300_000)
    assert [c.task_id for c in recorded] == ["S"]
    assert [c["kind"] for c in await page_all(client)] == ["phase"]  # the default
    stale = await page_all(client, kind="stale")
    assert [(c["taskId"], c["kind"], c["phase"]) for c in stale] == [("S", "stale", "running")]
    assert [c["kind"] for c in await page_all(client, kind="all")] == ["phase", "stale"]


class _StaleOldest(MemoryStore):
    """Answers its first oldest_change_seq as it was before a pruning that then ran."""

    def __init__(self) -> None:
        super().__init__()
        self.first: int | None = None

    async def oldest_change_seq(self) -> int:
        if self.first is not None:
            first, self.first = self.first, None
            return first
        return await super().oldest_change_seq()


async def test_a_reader_without_a_cursor_is_never_gone(make_client: MakeClient) -> None:
    """Retention may prune between the feed's look at the oldest change and its read: a
    reader that gave no cursor asked for the oldest retained, so it gets that, not 410."""
    store = _StaleOldest()
    client, _ = await make_client(store=store)
    for i in range(5):
        await put(client, f"o{i}", snapshot(f"O{i}", "running", 10 + i))
    assert await store.prune_changes(keep_last=2) == 3
    store.first = 1  # as read before the pruning
    status, body = await get(client)
    assert status == 200, body
    assert [c["taskId"] for c in body["changes"]] == ["O3", "O4"]
    store.first = 1
    async with client.get("/changes/stream") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")


async def test_updates_only_when_asked(make_client: MakeClient, tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "u.db", record_updates=True)
    client, _ = await make_client(store=store)
    await put(client, "a", snapshot("T", "running", 1))
    await put(client, "b", snapshot("T", "running", 2, status_extra={"progress": 0.5}))
    await put(client, "c", snapshot("T", "completed", 3))
    assert [c["kind"] for c in await page_all(client)] == ["phase", "phase"]
    assert [c["kind"] for c in await page_all(client, kind="all")] == ["phase", "update", "phase"]
    assert [c["kind"] for c in await page_all(client, kind="phase,update")] == [
        "phase",
        "update",
        "phase",
    ]
    assert [c["kind"] for c in await page_all(client, kind="update")] == ["update"]


async def test_credentials_never_appear(make_client: MakeClient) -> None:
    client, _ = await make_client()
    snap = snapshot(
        "T",
        "running",
        5,
        type="s3+https://KEY:SECRETVALUE@host/x",
        params={"export": {"custom": {"url": "https://u:SECRETVALUE@x.example/h"}}},
    )
    await put(client, "e1", snap)
    response = await client.get("/changes")
    text = await response.text()
    assert "SECRETVALUE" not in text
    (change,) = orjson.loads(text)["changes"]
    assert set(change) == FIELDS
    assert change["type"] == redact_text("s3+https://KEY:SECRETVALUE@host/x")
    stream = await client.get("/changes/stream")
    seen = b""
    while b"event: change" not in seen:
        seen += await stream.content.readany()
    stream.close()
    assert b"SECRETVALUE" not in seen


async def test_bad_queries_are_400(make_client: MakeClient) -> None:
    client, _ = await make_client()
    bad: list[dict[str, Any]] = [
        {"after": "garbage"},
        {"after": Cursor(1, "T").encode()},
        {"after": ""},
        {"limit": 0},
        {"limit": 1001},
        {"limit": "ten"},
        {"wait": -1},
        {"wait": 31},
        {"wait": "nan"},
        {"wait": "soon"},
        {"kind": "bogus"},
        {"kind": "phase,bogus"},
        {"nope": 1},
        {"token": "t"},  # only the stream takes a token in the query
    ]
    for params in bad:
        status, body = await get(client, **params)
        assert status == 400, params
        assert body["error"] == "bad_query" and body["message"], params
    status, body = await get(client, after="garbage")
    assert "cursor" in body["message"]
    for params in ({"after": "garbage"}, {"kind": "x"}, {"limit": 5}):
        status, body = await get(client, "/changes/stream", **params)
        assert status == 400, params
    response = await client.get("/changes/stream", headers={"Last-Event-ID": "garbage"})
    assert response.status == 400
    assert (await response.json())["error"] == "bad_query"


async def test_long_poll_wakes_when_a_change_commits(make_client: MakeClient, store: Store) -> None:
    client, service = await make_client(store=store)
    await put(client, "e0", snapshot("T", "pending", 1))
    status, body = await get(client)
    head = body["next"]
    waiter = asyncio.create_task(get(client, after=head, wait=30))
    await wait_until(lambda: service.feed.waiting == 1, "the long-poll to wait")
    await put(client, "e1", snapshot("T", "running", 2))
    status, woke = await asyncio.wait_for(waiter, 30)
    assert status == 200
    assert [(c["previousPhase"], c["phase"]) for c in woke["changes"]] == [("pending", "running")]
    assert woke["next"] == woke["changes"][-1]["cursor"]
    # A filtered waiter is not answered by a change it does not want, but moves past it.
    waiter = asyncio.create_task(get(client, after=woke["next"], wait=30, phase="completed"))
    await wait_until(lambda: service.feed.waiting == 1, "the filtered long-poll to wait")
    await put(client, "e2", snapshot("U", "pending", 3))
    await put(client, "e3", snapshot("T", "completed", 4))
    status, done = await asyncio.wait_for(waiter, 30)
    assert [c["phase"] for c in done["changes"]] == ["completed"]


async def test_long_poll_without_a_change_answers_empty_at_its_wait(
    make_client: MakeClient, store: Store
) -> None:
    client, _ = await make_client(store=store)
    await put(client, "e0", snapshot("T", "pending", 1))
    status, body = await get(client)
    status, empty = await get(client, after=body["next"], wait=0.3)
    assert (status, empty) == (200, {"changes": [], "next": body["next"]})


async def test_a_commit_by_another_replica_wakes_the_waiter(
    make_client: MakeClient, pg_url: str
) -> None:
    client, service = await make_client(store=PostgresStore(pg_url, pool_size=4))
    other = PostgresStore(pg_url, pool_size=2)
    await other.open()
    try:
        _, body = await get(client, after="now")
        waiter = asyncio.create_task(get(client, after=body["next"], wait=30))
        await wait_until(lambda: service.feed.waiting == 1, "the long-poll to wait")
        await other.ingest([decode(webhook_body("x1", snapshot("R", "running", 7)))], "kafka", 1)
        _, woke = await asyncio.wait_for(waiter, 30)
        assert [(c["taskId"], c["phase"]) for c in woke["changes"]] == [("R", "running")]
    finally:
        await other.close()


async def test_a_pruned_cursor_is_410(make_client: MakeClient, store: Store) -> None:
    client, service = await make_client(store=store)
    for i in range(5):
        await put(client, f"e{i}", snapshot(f"T{i}", "pending", i + 1))
    before = await page_all(client)
    assert len(before) == 5
    assert await service.store.prune_changes(keep_last=2) == 3
    status, body = await get(client, after=before[0]["cursor"])
    assert status == 410 and body["error"] == "gone"
    assert "GET /tasks" in body["message"] and "without after" in body["message"]
    # The newest pruned cursor is still good: nothing after it is missing.
    status, body = await get(client, after=before[2]["cursor"])
    assert status == 200 and body["changes"] == before[3:]
    # Without after, the feed starts at the oldest change retained.
    assert await page_all(client) == before[3:]
    response = await client.get("/changes/stream", headers={"Last-Event-ID": before[1]["cursor"]})
    assert response.status == 410
    assert (await response.json())["error"] == "gone"


async def test_the_retention_loop_prunes(make_client: MakeClient) -> None:
    client, service = await make_client(changes_retention="3", changes_retention_interval_s=0.05)
    for i in range(6):
        await put(client, f"e{i}", snapshot(f"T{i}", "pending", i + 1))

    async def pruned() -> bool:
        return await service.store.oldest_change_seq() == 4

    await wait_until(pruned, "retention to keep the newest 3")
    assert [c["taskId"] for c in await page_all(client)] == ["T3", "T4", "T5"]
    assert len(await service.store.task_history("T0")) == 1  # the history is kept
    status, _ = await get(client, after=encode_cursor(1))
    assert status == 410


async def test_retention_runs_under_one_lease(tmp_path: Any) -> None:
    store = MemoryStore()
    for i in range(4):
        await store.ingest([decode(webhook_body(f"e{i}", snapshot(f"T{i}", "pending", 1)))], "w", 1)
    one = RetentionLoop(store, Retention(keep_last=1), needed_by=[], owner="one")
    two = RetentionLoop(store, Retention(keep_last=1), needed_by=[], owner="two")
    assert await one.prune_once(now_ms=1000) == 3
    assert await two.prune_once(now_ms=1000) is None  # "one" holds the lease
    assert await two.prune_once(now_ms=10_000_000) == 0  # expired: "two" takes over
    assert await store.oldest_change_seq() == 4


# -- GET /changes/stream --------------------------------------------------------------


@dataclass
class Sse:
    """A minimal SSE reader: events (id, event, data) and comments, as they arrive."""

    response: aiohttp.ClientResponse
    buffer: bytes = b""
    comments: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # every id field, id-only blocks too

    async def blocks(self) -> AsyncIterator[dict[str, str]]:
        while True:
            while b"\n\n" not in self.buffer:
                chunk = await self.response.content.readany()
                if not chunk:
                    return
                self.buffer += chunk
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
            if "id" in fields:
                self.ids.append(fields["id"])
            yield fields

    async def events(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` change events' data."""
        out: list[dict[str, Any]] = []
        async for block in self.blocks():
            if block.get("event") == "change":
                data = orjson.loads(block["data"])
                assert block["id"] == data["cursor"]
                out.append(data)
                if len(out) == n:
                    break
        return out


async def open_stream(
    client: Client, *, headers: dict[str, str] | None = None, **params: Any
) -> Sse:
    response = await client.get(
        "/changes/stream", params={k: str(v) for k, v in params.items()}, headers=headers or {}
    )
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return Sse(response)


async def test_stream_sends_backlog_then_live_changes(
    make_client: MakeClient, store: Store
) -> None:
    client, _ = await make_client(store=store)
    await put(client, "e0", snapshot("T", "pending", 1))
    await put(client, "e1", snapshot("T", "running", 2))
    sse = await open_stream(client)
    backlog = await sse.events(2)
    assert [c["phase"] for c in backlog] == ["pending", "running"]
    await put(client, "e2", snapshot("T", "completed", 3))
    (live,) = await sse.events(1)
    assert live["phase"] == "completed" and set(live) == FIELDS
    assert live == (await page_all(client))[-1]
    sse.response.close()
    # Resume after the first event: the rest, and nothing else.
    again = await open_stream(client, headers={"Last-Event-ID": backlog[0]["cursor"]})
    assert [c["phase"] for c in await again.events(2)] == ["running", "completed"]
    again.response.close()
    # ?after= works too; Last-Event-ID wins over it (a reconnecting EventSource).
    both = await open_stream(
        client, headers={"Last-Event-ID": backlog[1]["cursor"]}, after=backlog[0]["cursor"]
    )
    assert [c["phase"] for c in await both.events(1)] == ["completed"]
    both.response.close()


async def test_stream_heartbeats_and_filters(make_client: MakeClient) -> None:
    client, _ = await make_client(changes_heartbeat_s=0.1)
    sse = await open_stream(client, phase="completed")
    reader = asyncio.create_task(sse.events(1))
    await wait_until(lambda: "keep-alive" in sse.comments, "a heartbeat")
    assert "connected" in sse.comments
    await put(client, "e0", snapshot("T", "pending", 1))
    await put(client, "e1", snapshot("U", "pending", 1))
    # Rows no filter matched move the id on (an id-only block), without an event.
    await wait_until(lambda: encode_cursor(2) in sse.ids, "an id past the unmatched rows")
    assert not reader.done()
    await put(client, "e2", snapshot("T", "completed", 2))
    (done,) = await asyncio.wait_for(reader, 30)
    assert (done["taskId"], done["phase"]) == ("T", "completed")
    assert sse.ids[-1] == done["cursor"] == encode_cursor(3)
    sse.response.close()


async def test_stream_from_now(make_client: MakeClient) -> None:
    client, _ = await make_client()
    await put(client, "e0", snapshot("T", "pending", 1))
    sse = await open_stream(client, after="now")
    await put(client, "e1", snapshot("T", "running", 2))
    (live,) = await sse.events(1)
    assert live["phase"] == "running"
    sse.response.close()


async def test_stream_auth_takes_a_query_token(make_client: MakeClient) -> None:
    client, _ = await make_client(api_token="s3cret")
    assert (await client.get("/changes")).status == 401
    assert (await client.get("/changes", params={"token": "s3cret"})).status == 401
    ok = await client.get("/changes", headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200
    for params in ({}, {"token": ""}, {"token": "wrong"}, {"token": "s3cret "}):
        response = await client.get("/changes/stream", params=params)
        assert response.status == 401, params
    wrong_header = await client.get(
        "/changes/stream", params={"token": "s3cret"}, headers={"Authorization": "Bearer no"}
    )
    assert wrong_header.status == 401
    by_query = await client.get("/changes/stream", params={"token": "s3cret"})
    by_header = await client.get("/changes/stream", headers={"Authorization": "Bearer s3cret"})
    assert (by_query.status, by_header.status) == (200, 200)
    by_query.close()
    by_header.close()
    # The token in a logged URL is cut out like every credential.
    assert "s3cret" not in redact_text("GET /changes/stream?token=s3cret 200")


async def test_a_slow_client_is_dropped_not_buffered(make_client: MakeClient) -> None:
    store = MemoryStore()
    client, service = await make_client(
        store=store, changes_stream_max_buffer_bytes=64 * 1024, changes_stream_drain_timeout_s=0.5
    )
    # Far more than the socket buffers hold: ~16 MB of events.
    for start in range(0, 50_000, 1000):
        batch = [
            decode(webhook_body(f"e{i}", snapshot(f"T{i}", "pending", 1)))
            for i in range(start, start + 1000)
        ]
        await store.ingest(batch, "webhook", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.server.host, client.server.port))
    try:
        await loop.sock_sendall(sock, b"GET /changes/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        # Never read: the server must give up on this client rather than buffer for it.
        await wait_until(lambda: service.feed.dropped == 1, "the slow client to be dropped")
        await wait_until(lambda: service.feed.streams == 0, "its stream to end")
    finally:
        sock.close()
    # Everyone else is still served.
    sse = await open_stream(client, after=encode_cursor(49_990))
    assert len(await sse.events(10)) == 10
    sse.response.close()


async def test_streams_end_when_the_service_stops(make_client: MakeClient) -> None:
    client, service = await make_client()
    await put(client, "e0", snapshot("T", "pending", 1))
    sse = await open_stream(client)
    assert len(await sse.events(1)) == 1
    waiter = asyncio.create_task(get(client, after="now", wait=30))
    await wait_until(lambda: service.feed.waiting == 2, "the stream and the long-poll to wait")
    await service.feed.close()
    status, body = await asyncio.wait_for(waiter, 30)
    assert status == 200 and body["changes"] == []
    rest = [b async for b in sse.blocks()]  # the stream ends
    assert not any(b.get("event") == "change" for b in rest)


# -- the feed sees what the handlers see ----------------------------------------------


async def test_feed_and_handlers_see_the_same_changes_in_the_same_order(
    make_client: MakeClient, store: Store
) -> None:
    handled: list[tuple[int, str, str | None, str]] = []

    async def record(change: Any) -> None:
        handled.append((change.seq, change.task_id, change.previous_phase, change.phase))

    client, service = await make_client(
        store=store, handlers=[Subscription(name="record", fn=record)]
    )
    stream = sorted(deliveries("small"), key=Delivery.order_key)
    half = len(stream) // 2
    streamed: list[dict[str, Any]] = []

    async def reader() -> None:
        # Reads some events, drops the connection, resumes with Last-Event-ID.
        sse = await open_stream(client)
        streamed.extend(await sse.events(25))
        sse.response.close()
        total = sum(len(v) for v in expected_changes("small").values())
        while len(streamed) < total:
            sse = await open_stream(client, headers={"Last-Event-ID": streamed[-1]["cursor"]})
            streamed.extend(await sse.events(min(40, total - len(streamed))))
            sse.response.close()

    for d in stream[:half]:
        await post(client, d)
    task = asyncio.create_task(reader())
    for d in stream[half:]:
        await post(client, d)
    await asyncio.wait_for(task, 60)
    expected = expected_changes("small")
    total = sum(len(v) for v in expected.values())
    await wait_until(lambda: len(handled) >= total, "the handler to get every change")
    seqs = [decode_cursor(c["cursor"]) for c in streamed]
    assert seqs == sorted(set(seqs)), "no duplicate, in commit order"
    assert seqs == [seq for seq, *_ in await outbox(service)], "no gap"
    assert per_task(streamed) == expected
    by_task: dict[str, list[tuple[int, str | None, str]]] = {}
    for seq, task_id, previous, phase in sorted(handled):
        by_task.setdefault(task_id, []).append((seq, previous, phase))
    fed: dict[str, list[tuple[int, str | None, str]]] = {}
    for c in streamed:
        fed.setdefault(c["taskId"], []).append(
            (decode_cursor(c["cursor"]), c["previousPhase"], c["phase"])
        )
    assert fed == by_task
    # The handler got each task's changes in the feed's order.
    order: dict[str, list[int]] = {}
    for seq, task_id, *_ in handled:
        order.setdefault(task_id, []).append(seq)
    assert all(v == sorted(v) for v in order.values())


async def test_commits_close_together_wake_readers_once() -> None:
    feed = ChangeFeed(StreamConfig(linger_s=3600))
    seen = feed.generation
    feed.notify()  # the first commit after a quiet spell wakes at once
    assert (feed.wakes, feed.generation) == (1, seen + 1)
    feed.notify()
    feed.notify()  # within linger_s of that wake: one more wake, later, for both
    assert (feed.notifies, feed.wakes) == (3, 1)
    await feed.close()  # a stop wakes everyone at once, and drops the pending wake
    assert feed.wakes == 2 and feed.closing
    assert await feed.wait(feed.generation, None)  # closing: never waits
