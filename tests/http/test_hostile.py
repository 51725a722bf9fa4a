"""Hostile input through the real HTTP path: every bad request is a 4xx with a message,
never a 5xx that a sender retries for a day, never half-applied."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import orjson
import pytest

from consumer.core.codec import MAX_DEPTH, Event, EventFormat
from consumer.store.sqlite.store import SQLiteStore
from tests.http.conftest import PATH, MakeClient
from tests.http.test_webhook import signed
from tests.support import snapshot, webhook_body


@pytest.mark.parametrize("where", ["snapshot", "envelope"])
async def test_deep_nesting_is_422_and_stores_nothing(make_client: MakeClient, where: str) -> None:
    """A snapshot nested 254+ levels passed decode and failed at commit: 503 forever."""
    client, service = await make_client()
    task = snapshot("T", "running", 1)
    doc = orjson.loads(webhook_body("e-deep", task))
    # orjson cannot write it either: build the body by hand.
    body = _deep_body(doc, where)
    response = await client.post(PATH, data=body, headers=signed(body))
    assert response.status == 422
    answer = await response.json()
    assert answer["error"] == "too_deep" and str(MAX_DEPTH) in answer["message"]
    assert (await service.store.stats()).events == 0


def _deep_body(doc: dict[str, Any], where: str) -> bytes:
    marker = '"__deep__"'
    if where == "snapshot":
        doc["payload"]["task"]["snapshot"]["params"] = {"x": "__deep__"}
    else:
        doc["extra"] = "__deep__"
    return orjson.dumps(doc).replace(marker.encode(), b"[" * 300 + b"1" + b"]" * 300)


async def test_nesting_at_the_limit_is_stored_and_read_back(make_client: MakeClient) -> None:
    client, _ = await make_client()
    task = snapshot("T", "running", 1, params={"x": "__deep__"})
    # The envelope adds 5 levels (body, payload, task, snapshot, params) above "x".
    body = webhook_body("e-ok", task).replace(
        b'"__deep__"', b"[" * (MAX_DEPTH - 6) + b"1" + b"]" * (MAX_DEPTH - 6)
    )
    response = await client.post(PATH, data=body, headers=signed(body))
    assert response.status == 200
    assert (await client.get("/tasks/T")).status == 200
    assert (await client.get("/tasks/T/history")).status == 200


async def test_history_never_fails_on_a_stored_body(make_client: MakeClient, tmp_path: Any) -> None:
    """A body stored before the nesting limit (or by any other writer) must not make
    /tasks/{id}/history a 500 for good."""
    store = SQLiteStore(tmp_path / "old.db")
    await store.open()
    deep = b"[" * 300 + b"1" + b"]" * 300
    event = Event(
        "e-old", "task.updated", EventFormat.WEBHOOK, 1, deep, "T", snapshot("T", "running", 1)
    )
    await store.ingest([event], "webhook", 1)
    await store.close()
    client, _ = await make_client(store=SQLiteStore(tmp_path / "old.db"))
    response = await client.get("/tasks/T/history")
    assert response.status == 200
    (entry,) = (await response.json())["events"]
    assert entry["body"] is None and "nests over" in entry["bodyError"]


def cursor(doc: bytes) -> str:
    return base64.urlsafe_b64encode(doc).decode()


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("/tasks?updated_since=9223372036854775808", "time out of range"),
        ("/tasks?updated_since=-99999999999999999999999", "time out of range"),
        ("/tasks?limit=99999999999999999999999999", "limit"),
        (
            "/tasks?cursor=" + base64.urlsafe_b64encode(b'[9223372036854775808,"x"]').decode(),
            "cursor",
        ),
        ("/tasks?cursor=" + base64.urlsafe_b64encode(b'[1e400,"x"]').decode(), "cursor"),
        ("/tasks?cursor=%%%", "cursor"),
    ],
)
async def test_out_of_range_numbers_in_queries_are_400(
    make_client: MakeClient, path: str, what: str
) -> None:
    client, _ = await make_client()
    response = await client.get(path)
    assert response.status == 400
    assert what in (await response.json())["message"]


@pytest.mark.parametrize("action", ["retry", "drop"])
@pytest.mark.parametrize("seq", [2**63, -(2**63) - 1, 10**30])
async def test_out_of_range_seqs_for_dead_letters_are_400(
    make_client: MakeClient, action: str, seq: int
) -> None:
    client, _ = await make_client()
    body = json.dumps({"seqs": [seq]})  # orjson refuses to write these; senders do not
    response = await client.post(f"/dead-letters/{action}", data=body)
    assert response.status == 400
    assert "64-bit" in (await response.json())["message"]


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("deflate", b"this is not deflate"),
        ("gzip", b"\x1f\x8b\x08\x00broken"),
        ("deflate", b""),
        ("deflate", b"[]"),
        ("gzip", zlib.compress(b"{}")[:-3]),
    ],
)
async def test_a_body_whose_encoding_does_not_decode_is_400(
    make_client: MakeClient, encoding: str, body: bytes
) -> None:
    client, service = await make_client(webhook_secret=None)
    headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
    response = await client.post(PATH, data=body, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"] in ("bad_encoding", "not_json")
    assert (await service.store.stats()).events == 0


async def test_an_unsupported_encoding_is_415(make_client: MakeClient) -> None:
    client, _ = await make_client(webhook_secret=None)
    headers = {"Content-Encoding": "br", "Content-Type": "application/json"}
    response = await client.post(PATH, data=b"\x0b\x02\x80{}\x03", headers=headers)
    assert response.status == 415
    assert (await response.json())["error"] == "unsupported_encoding"


async def test_a_body_that_inflates_past_the_limit_is_413(make_client: MakeClient) -> None:
    """A small compressed body must not be inflated in full past the size limit."""
    client, _ = await make_client(webhook_secret=None, webhook_max_body_bytes=10_000)
    bomb = zlib.compress(b" " * 5_000_000)  # 5 MB of spaces in a few KB
    headers = {"Content-Encoding": "deflate", "Content-Type": "application/json"}
    response = await client.post(PATH, data=bomb, headers=headers)
    assert response.status == 413
    assert (await response.json())["error"] == "too_large"


async def test_a_compressed_body_is_verified_as_livepeer_signed_it(make_client: MakeClient) -> None:
    """The signature covers the JSON Livepeer sent; a proxy's Content-Encoding is undone
    first."""
    client, _ = await make_client()
    body = webhook_body("e-z", snapshot("T", "running", 1))
    headers = {**signed(body), "Content-Encoding": "deflate"}
    response = await client.post(PATH, data=zlib.compress(body), headers=headers)
    assert response.status == 200


async def test_4xx_bodies_do_not_echo_input(make_client: MakeClient) -> None:
    client, _ = await make_client()
    probe = "<script>alert(1)</script>"
    for path in (f"/tasks/{probe}", f"/tasks?{probe}=1", f"/tasks?updated_since={probe}"):
        response = await client.get(path)
        assert 400 <= response.status < 500
        assert probe not in await response.text()
    task = snapshot("T", "running", 1)
    doc = orjson.loads(webhook_body("e-x", task))
    doc["payload"]["task"]["id"] = probe
    body = orjson.dumps(doc)
    response = await client.post(PATH, data=body, headers=signed(body))
    assert response.status == 422 and probe not in await response.text()
