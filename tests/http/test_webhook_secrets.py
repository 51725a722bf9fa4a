"""Several webhook secrets (issue #15) and receipts, through the real HTTP path: a
delivery signed with any listed secret is accepted and its history entry names the
secret; others get 401; a rotation; the request's traceparent kept with the event and
its change."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import ValidationError

from consumer.core.receipt import Receipt
from consumer.core.signature import sign
from consumer.settings import Settings, describe_invalid
from consumer.sources.webhook import WebhookConfig
from consumer.store.memory import MemoryStore
from tests.http.conftest import PATH, MakeClient
from tests.support import snapshot, webhook_body

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def body(event_id: str, task_id: str, phase: str, t: int) -> bytes:
    return webhook_body(event_id, snapshot(task_id, phase, t))


async def post(
    client: TestClient[Any, Any], raw: bytes, secret: bytes | None, **headers: str
) -> int:
    sent = dict(headers)
    if secret is not None:
        sent["Livepeer-Signature"] = sign(secret, raw, int(time.time() * 1000))
    response = await client.post(PATH, data=raw, headers=sent)
    await response.read()
    return response.status


async def verified_by(client: TestClient[Any, Any], task_id: str) -> dict[str, Any]:
    response = await client.get(f"/tasks/{task_id}/history")
    assert response.status == 200
    return {e["eventId"]: e["verifiedBy"] for e in (await response.json())["events"]}


async def test_any_listed_secret_is_accepted_and_recorded_by_name_or_index(
    make_client: MakeClient,
) -> None:
    client, service = await make_client(webhook_secret="s-first, prod=s-second ,s-third")
    for i, secret in enumerate([b"s-first", b"s-second", b"s-third"]):
        assert await post(client, body(f"e{i}", "T", "running", i + 1), secret) == 200
    assert await verified_by(client, "T") == {"e0": "0", "e1": "prod", "e2": "2"}
    history = await service.store.task_history("T")
    assert [h.receipt for h in history] == [Receipt("0"), Receipt("prod"), Receipt("2")]


@pytest.mark.parametrize(
    "secret", [b"s-fourth", b"prod=s-second", b"prod", b"s-first,s-third", b"", None]
)
async def test_a_delivery_not_signed_with_a_listed_secret_gets_401(
    make_client: MakeClient, secret: bytes | None
) -> None:
    client, service = await make_client(webhook_secret="s-first,prod=s-second,s-third")
    raw = body("e1", "T", "pending", 1)
    response = await client.post(
        PATH,
        data=raw,
        headers={} if secret is None else {"Livepeer-Signature": sign(secret, raw, 1)},
    )
    assert response.status == 401
    document = await response.json()
    assert document["error"] == "bad_signature"
    assert "s-first" not in str(document) and "s-second" not in str(document)
    assert (await service.store.stats()).events == 0


async def test_a_rotation_never_refuses_a_delivery_signed_with_a_current_secret(
    make_client: MakeClient,
) -> None:
    """Old only; then old and new (Livepeer switches to the new one meanwhile); then new
    only. One store throughout, as replicas restarted one by one would share."""
    store = MemoryStore()
    old, _ = await make_client(store=store, webhook_secret="old=secret-2024")
    assert await post(old, body("a", "T", "pending", 1), b"secret-2024") == 200
    both, _ = await make_client(store=store, webhook_secret="old=secret-2024,new=secret-2025")
    assert await post(both, body("b", "T", "running", 2), b"secret-2024") == 200
    assert await post(both, body("c", "T", "running", 3), b"secret-2025") == 200
    new, _ = await make_client(store=store, webhook_secret="new=secret-2025")
    assert await post(new, body("d", "T", "completed", 4), b"secret-2024") == 401
    assert await post(new, body("d", "T", "completed", 4), b"secret-2025") == 200
    assert await verified_by(new, "T") == {"a": "old", "b": "old", "c": "new", "d": "new"}
    # A resend of an accepted delivery, now signed with the new secret, is a duplicate
    # and keeps the record of the secret that verified it first.
    assert await post(new, body("b", "T", "running", 2), b"secret-2025") == 200
    assert (await verified_by(new, "T"))["b"] == "old"


async def test_the_traceparent_is_kept_with_the_event_and_its_change(
    make_client: MakeClient,
) -> None:
    client, service = await make_client(webhook_secret="k1,k2")
    secret = b"k2"
    assert await post(client, body("e1", "T", "pending", 1), secret, traceparent=TRACE) == 200
    assert await post(client, body("e2", "T", "running", 2), secret, traceparent="junk") == 200
    assert await post(client, body("e3", "T", "failed", 3), secret) == 200
    history = await service.store.task_history("T")
    assert [h.receipt for h in history] == [Receipt("1", TRACE), Receipt("1"), Receipt("1")]
    changes = await service.store.task_changes("T")
    assert [(c.phase, c.traceparent) for c in changes] == [
        ("pending", TRACE),
        ("running", None),
        ("failed", None),
    ]


async def test_two_traceparent_headers_are_none(make_client: MakeClient) -> None:
    client, service = await make_client(webhook_secret=None)
    raw = body("e1", "T", "pending", 1)
    response = await client.post(
        PATH, data=raw, headers=[("traceparent", TRACE), ("traceparent", TRACE)]
    )
    assert response.status == 200
    assert [h.receipt for h in await service.store.task_history("T")] == [None]


async def test_unsigned_deliveries_name_no_secret_but_keep_their_trace(
    make_client: MakeClient,
) -> None:
    client, service = await make_client(webhook_secret=None)
    assert await post(client, body("e1", "T", "pending", 1), None, traceparent=TRACE) == 200
    assert await post(client, body("e2", "T", "running", 2), None) == 200
    assert await verified_by(client, "T") == {"e1": None, "e2": None}
    history = await service.store.task_history("T")
    assert [h.receipt for h in history] == [Receipt(traceparent=TRACE), None]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("s3cret-a,,s3cret-b", "the item at index 1 (0-based) of 3 is empty"),
        ("s3cret-a,", "the item at index 1 (0-based) of 2 is empty"),
        ("", "is empty"),
        ("x=s3cret-1,x=s3cret-2", "the name 'x' is given to two secrets"),
    ],
)
def test_a_bad_list_is_a_setting_error_naming_the_variable(value: str, says: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(webhook_secret=value)
    line = describe_invalid(raised.value)
    assert line.startswith("PHASEWATCH_WEBHOOK_SECRET: ") and says in line
    assert "s3cret" not in line


def test_the_config_never_shows_its_secrets() -> None:
    config = WebhookConfig(b"hunter2,p=hunter3")
    assert [s.name for s in config.secrets] == ["0", "p"]
    assert "hunter" not in repr(config)
    assert WebhookConfig().secrets == ()
