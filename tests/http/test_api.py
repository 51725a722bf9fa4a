"""The read API: task lookup, listing with filters and cursors, history, auth."""

from __future__ import annotations

import time
from typing import Any

import pytest

from consumer.core.secrets import MARKER
from consumer.core.signature import sign
from tests.http.conftest import PATH, MakeClient
from tests.support import FIXTURE_SECRET, snapshot, webhook_body


async def put(client: Any, event_id: str, snap: dict[str, Any], **kw: Any) -> None:
    body = webhook_body(event_id, snap, **kw)
    headers = {"Livepeer-Signature": sign(FIXTURE_SECRET, body, int(time.time() * 1000))}
    response = await client.post(PATH, data=body, headers=headers)
    assert response.status == 200, await response.text()


async def test_get_task_hides_credentials(make_client: MakeClient) -> None:
    client, _ = await make_client()
    await put(
        client,
        "e1",
        snapshot(
            "T",
            "running",
            5,
            params={
                "export": {
                    "custom": {
                        "url": "https://u:p@x.example/h",
                        "headers": {"Authorization": "Bearer s"},
                    }
                }
            },
        ),
    )
    task = await (await client.get("/tasks/T")).json()
    assert task["params"]["export"]["custom"] == {
        "url": "https://x.example/h",
        "headers": {"Authorization": MARKER},
    }
    assert task["status"] == {"phase": "running", "updatedAt": 5}


async def test_unknown_task_is_404(make_client: MakeClient) -> None:
    client, _ = await make_client()
    for path in ("/tasks/nope", "/tasks/nope/history"):
        response = await client.get(path)
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"


async def test_list_filters_and_cursor(make_client: MakeClient) -> None:
    client, _ = await make_client()
    for i in range(7):
        await put(
            client,
            f"e{i}",
            {
                **snapshot(f"T{i}", "completed" if i % 2 else "failed", 1000 + i),
                "type": "clip" if i < 3 else "upload",
            },
        )
    ids: list[str] = []
    params: dict[str, str] = {"phase": "completed,failed", "limit": "2"}
    while True:
        page = await (await client.get("/tasks", params=params)).json()
        ids.extend(t["id"] for t in page["tasks"])
        if not page["nextCursor"]:
            break
        params["cursor"] = page["nextCursor"]
    assert ids == [f"T{i}" for i in range(7)]
    clips = await (await client.get("/tasks", params={"type": "clip", "phase": "failed"})).json()
    assert [t["id"] for t in clips["tasks"]] == ["T0", "T2"]
    since_iso = await (
        await client.get("/tasks", params={"updated_since": "1970-01-01T00:00:01.005Z"})
    ).json()
    assert [t["id"] for t in since_iso["tasks"]] == ["T5", "T6"]
    since_ms = await (await client.get("/tasks", params={"updated_since": "1005"})).json()
    assert since_ms == since_iso


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "x"},
        {"limit": "5000"},
        {"order": "sideways"},
        {"cursor": "!!!"},
        {"updated_since": "last tuesday"},
        {"colour": "blue"},
    ],
)
async def test_bad_queries_are_400(make_client: MakeClient, query: dict[str, str]) -> None:
    client, _ = await make_client()
    response = await client.get("/tasks", params=query)
    assert response.status == 400
    assert (await response.json())["error"] == "bad_query"


async def test_history_lists_events_and_changes_in_order(make_client: MakeClient) -> None:
    client, _ = await make_client()
    await put(client, "e2", snapshot("T", "running", 20))
    await put(client, "e1", snapshot("T", "pending", 10), event="task.spawned")  # late, older
    await put(
        client,
        "e3",
        {**snapshot("T", "completed", 30), "params": {"upload": {"url": "https://k:s@cdn/x"}}},
    )
    history = await (await client.get("/tasks/T/history")).json()
    assert [e["eventId"] for e in history["events"]] == ["e2", "e1", "e3"]
    assert history["events"][1]["event"] == "task.spawned"
    assert "k:s@" not in str(history)
    assert [(c["previousPhase"], c["phase"]) for c in history["phaseChanges"]] == [
        (None, "running"),
        ("running", "completed"),
    ]


async def test_api_token_guards_reads_not_webhooks_or_health(make_client: MakeClient) -> None:
    client, _ = await make_client(api_token="s3cret")
    await put(client, "e1", snapshot("T", "pending", 1))
    assert (await client.get("/tasks/T")).status == 401
    assert (await client.get("/tasks", headers={"Authorization": "Bearer wrong"})).status == 401
    ok = await client.get("/tasks/T", headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200
    assert (await client.get("/healthz")).status == 200
