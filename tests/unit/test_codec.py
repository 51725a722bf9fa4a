"""The codec: three formats in, typed errors out."""

from __future__ import annotations

import orjson
import pytest

from consumer.core.codec import EventFormat, InvalidEvent, NotAnEvent, NotJSON, decode
from tests.support import deliveries, snapshot, webhook_body


def test_webhook_body() -> None:
    raw = deliveries("small")[0].body
    event = decode(raw)
    doc = orjson.loads(raw)
    assert event.format is EventFormat.WEBHOOK
    assert event.id == doc["id"]
    assert event.kind == "task.spawned"
    assert event.task_id == doc["payload"]["task"]["id"]
    assert event.snapshot == doc["payload"]["task"]["snapshot"]
    assert event.created_at == doc["createdAt"]
    assert event.raw == raw
    assert event.phase == "pending"


def test_bus_webhook_event() -> None:
    snap = snapshot("T1", "running", 20)
    raw = orjson.dumps(
        {
            "type": "webhook_event",
            "id": "bus-1",
            "timestamp": 19,
            "event": "task.updated",
            "userId": "u",
            "projectId": "p",
            "payload": {"task": {"id": "T1", "type": "upload", "snapshot": snap}},
        }
    )
    event = decode(raw)
    assert event.format is EventFormat.BUS
    assert (event.id, event.task_id, event.created_at, event.phase) == (
        "bus-1",
        "T1",
        19,
        "running",
    )


def test_bare_task_gets_a_content_derived_id() -> None:
    snap = snapshot("T1", "completed", 30)
    first = decode(orjson.dumps(snap))
    assert first.format is EventFormat.TASK
    assert first.task_id == "T1" and first.kind == "task.snapshot"
    # Same content in another key order: same event, so re-polling deduplicates.
    reordered = orjson.dumps(dict(reversed(list(snap.items()))))
    assert decode(reordered).id == first.id
    changed = decode(orjson.dumps(snapshot("T1", "completed", 31)))
    assert changed.id != first.id


def test_non_task_events_are_accepted_without_a_task() -> None:
    raw = orjson.dumps(
        {
            "id": "e1",
            "createdAt": 5,
            "timestamp": 6,
            "event": "asset.ready",
            "payload": {"asset": {"id": "A", "snapshot": {}}},
        }
    )
    event = decode(raw)
    assert event.task_id is None and event.snapshot is None and event.kind == "asset.ready"


def test_snapshot_without_id_takes_the_envelope_task_id() -> None:
    snap = snapshot("T9", "waiting", 3)
    del snap["id"]
    raw = orjson.dumps(
        {
            "id": "e",
            "createdAt": 1,
            "event": "task.updated",
            "payload": {"task": {"id": "T9", "snapshot": snap}},
        }
    )
    event = decode(raw)
    assert event.task_id == "T9" and event.snapshot is not None and event.snapshot["id"] == "T9"


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"a":', b"\xff\xfe", b"[1,2]", b"42", b"null"])
def test_not_json(raw: bytes) -> None:
    with pytest.raises(NotJSON) as info:
        decode(raw)
    assert info.value.http_status == 400


@pytest.mark.parametrize("doc", [{}, {"hello": "world"}, {"event": "task.updated"}, {"id": "x"}])
def test_not_an_event(doc: object) -> None:
    with pytest.raises(NotAnEvent) as info:
        decode(orjson.dumps(doc))
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"event": "task.updated", "payload": {}, "createdAt": 1, "id": "e"}, "payload.task"),
        (
            {"event": "task.updated", "payload": {"task": {"id": "T"}}, "createdAt": 1, "id": "e"},
            "snapshot",
        ),
        (
            {
                "event": "task.updated",
                "createdAt": 1,
                "payload": {"task": {"snapshot": snapshot("T", "x", 1)}},
            },
            "'id'",
        ),
        (
            {
                "event": "task.updated",
                "id": "e",
                "createdAt": "now",
                "payload": {"task": {"snapshot": snapshot("T", "x", 1)}},
            },
            "createdAt",
        ),
        (
            {
                "event": "task.updated",
                "id": "e",
                "createdAt": 1,
                "payload": {"task": {"id": "OTHER", "snapshot": snapshot("T", "x", 1)}},
            },
            "differs",
        ),
        (
            {
                "event": "task.updated",
                "id": "e",
                "createdAt": 1,
                "payload": {"task": {"snapshot": {"id": "T", "status": {"updatedAt": 1}}}},
            },
            "status.phase",
        ),
        (
            {
                "event": "task.updated",
                "id": "e",
                "createdAt": 1,
                "payload": {
                    "task": {
                        "snapshot": {"id": "T", "status": {"phase": "running", "updatedAt": "1"}}
                    }
                },
            },
            "updatedAt",
        ),
        ({"id": "T", "status": {"phase": "running"}}, "updatedAt"),
        ({"id": "T", "status": {"phase": "running", "updatedAt": 2**64 - 1}}, "updatedAt"),
    ],
)
def test_invalid_events_say_what_is_wrong(doc: object, says: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(orjson.dumps(doc))
    assert says in str(info.value)
    assert info.value.http_status == 422


def test_webhook_helper_matches_fixture_shape() -> None:
    body = webhook_body("e1", snapshot("T", "pending", 1), event="task.spawned")
    assert decode(body).kind == "task.spawned"
