"""End to end: webhooks in, signed notifications out to a real HTTP receiver, with
retries, a dead letter, and its re-drive over the API."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import orjson
import pytest

from handlers import verify_notification
from tests.handlers.conftest import Answer, Receiver
from tests.http.conftest import PATH, MakeClient
from tests.support import snapshot, wait_until, webhook_body

SECRET = "whsec_" + base64.b64encode(b"receiver-shared-secret").decode()


@pytest.fixture
async def notified() -> AsyncIterator[Receiver]:
    """The notifier tests' real HTTP receiver, for this in-process service."""
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


async def test_notifications_retry_dead_letter_and_redrive(
    make_client: MakeClient, notified: Receiver
) -> None:
    receiver = notified
    client, service = await make_client(
        webhook_secret=None,
        notify_url=receiver.url("/hook"),
        notify_secret=SECRET,
        notify_phases="completed,failed",
        dispatch_max_attempts=3,
        api_token="tok",
    )
    auth = {"Authorization": "Bearer tok"}
    # Two 503s, then OK for the first delivery; a 400 (permanent) for the second.
    receiver.answer(Answer(503), Answer(503), Answer(200), Answer(400, "no such customer"))
    creds = {"transcode-file": {"storage": {"url": "s3+https://AKIA:SECRETKEY@s3.example/b"}}}
    for event_id, task_id, phase, t in [("a1", "A", "running", 1), ("a2", "A", "completed", 2)]:
        body = webhook_body(event_id, snapshot(task_id, phase, t, params=creds))
        assert (await client.post(PATH, data=body)).status == 200

    async def a_delivered() -> bool:
        return len(receiver.received) == 3

    await wait_until(a_delivered, "two 503s then a 200 for A")
    body = webhook_body("b1", snapshot("B", "failed", 3, params=creds))
    assert (await client.post(PATH, data=body)).status == 200

    async def dead_listed() -> bool:
        listed = await (await client.get("/dead-letters", headers=auth)).json()
        return len(listed["deadLetters"]) == 1

    await wait_until(dead_listed, "B's dead letter listed")
    listed = (await (await client.get("/dead-letters", headers=auth)).json())["deadLetters"]
    assert listed[0]["taskId"] == "B" and listed[0]["attempts"] == 1
    assert "HTTP 400" in listed[0]["error"] or "400" in listed[0]["error"]
    bodies = [orjson.loads(r.body) for r in receiver.received]
    assert [(b["taskId"], b["phase"]) for b in bodies] == [("A", "completed")] * 3 + [
        ("B", "failed")
    ]
    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert ids[0] == ids[1] == ids[2] != ids[3]  # stable across retries
    for r in receiver.received:
        verify_notification(SECRET, r.headers, r.body)
        assert b"SECRETKEY" not in r.body and b"AKIA" not in r.body

    # The receiver is fixed; re-drive the dead letter over the API.
    bad = await client.post("/dead-letters/retry", headers=auth, data=b"{}")
    assert bad.status == 400  # neither seqs nor all: never re-drive everything by accident
    moved = await client.post(
        "/dead-letters/retry", headers=auth, data=orjson.dumps({"seqs": [listed[0]["seq"]]})
    )
    assert (await moved.json())["moved"] == 1

    async def redelivered() -> bool:
        return len(receiver.received) == 5

    await wait_until(redelivered, "the re-driven notification")
    assert orjson.loads(receiver.received[4].body)["taskId"] == "B"
    assert (await (await client.get("/dead-letters", headers=auth)).json())["deadLetters"] == []

    # The receiver has the request before the handler returns and its record is written.
    def counted() -> bool:
        status = service.dispatcher.status()["handlers"]["http-notify"]
        return bool((status["delivered"], status["dead"]) == (2, 1))

    await wait_until(counted, "2 deliveries and 1 dead letter counted")
