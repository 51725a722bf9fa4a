"""The changes stream against a real ``phasewatch serve``: a reader that drops mid-stream
and resumes with Last-Event-ID sees every change once, in the handler's order; on
PostgreSQL a replica streams what another one ingested; streams end on a stop; a
retention value it cannot use stops the service with one line."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from consumer.api.changes import decode_cursor, encode_cursor
from tests.http.test_changes_feed import Sse
from tests.process.service_proc import PHASEWATCH, ServiceProcess
from tests.support import REPO, Delivery, deliveries, expected_changes, wait_until

pytestmark = pytest.mark.slow

HANDLER = "tests.process.recording_handler:record"
ENV = {
    "PHASEWATCH_WEBHOOK_SECRET": "whsec_fixture",
    "PHASEWATCH_WEBHOOK_TOLERANCE_S": "0",
    "PHASEWATCH_HANDLERS": HANDLER,
    "PHASEWATCH_CHANGES_HEARTBEAT_S": "0.5",
}
FIXTURE = sorted(deliveries("small"), key=Delivery.order_key)
TOTAL = sum(len(v) for v in expected_changes("small").values())


def handled(path: Path) -> list[list[Any]]:
    """What the recording handler wrote: ``[seq, task_id, previous, phase]`` lines."""
    try:
        lines = path.read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return []
    return [orjson.loads(line) for line in lines]


async def post_all(session: aiohttp.ClientSession, url: str, items: list[Delivery]) -> None:
    for d in items:
        async with session.post(
            f"{url}/webhooks/livepeer", data=d.body, headers={"Livepeer-Signature": d.signature}
        ) as response:
            assert response.status == 200, await response.text()


async def read_with_drops(
    session: aiohttp.ClientSession, url: str, total: int, *, drop_every: int = 30
) -> list[dict[str, Any]]:
    """Every change up to ``total``, reconnecting with Last-Event-ID every ``drop_every``
    events (the connection closed by the reader, as a flaky network would)."""
    seen: list[dict[str, Any]] = []
    while len(seen) < total:
        headers = {"Last-Event-ID": seen[-1]["cursor"]} if seen else {}
        async with session.get(f"{url}/changes/stream", headers=headers) as response:
            assert response.status == 200, await response.text()
            seen.extend(await Sse(response).events(min(drop_every, total - len(seen))))
    return seen


def check_against_handler(streamed: list[dict[str, Any]], calls: list[list[Any]]) -> None:
    seqs = [decode_cursor(c["cursor"]) for c in streamed]
    assert seqs == sorted(set(seqs)), "in commit order, no duplicate"
    assert sorted(seqs) == sorted(seq for seq, *_ in calls), "the handler's changes, no gap"
    per_task: dict[str, list[list[Any]]] = {}
    for c in streamed:
        per_task.setdefault(c["taskId"], []).append([c["previousPhase"], c["phase"]])
    assert per_task == expected_changes("small")
    fed: dict[str, list[int]] = {}
    for c in streamed:
        fed.setdefault(c["taskId"], []).append(decode_cursor(c["cursor"]))
    heard: dict[str, list[int]] = {}
    for seq, task_id, *_ in calls:
        heard.setdefault(task_id, []).append(seq)
    assert fed == heard, "each task's changes in the same order"


async def test_stream_drop_and_resume_on_sqlite(tmp_path: Path) -> None:
    record = tmp_path / "handled.jsonl"
    service = ServiceProcess(tmp_path / "pw.db", ENV, PHASEWATCH_TEST_RECORD=str(record)).start()
    try:
        async with aiohttp.ClientSession() as session:
            await post_all(session, service.url, FIXTURE[: len(FIXTURE) // 3])
            reader = asyncio.create_task(read_with_drops(session, service.url, TOTAL))
            await post_all(session, service.url, FIXTURE[len(FIXTURE) // 3 :])
            streamed = await asyncio.wait_for(reader, 120)
            await wait_until(lambda: len(handled(record)) >= TOTAL, "every change handled")
            check_against_handler(streamed, handled(record))
            # A stream open at stop ends, and the service stops cleanly.
            async with session.get(f"{service.url}/changes/stream?after=now") as response:
                first = await anext(Sse(response).blocks())  # ": connected"
                assert first == {}
                assert service.stop() == 0
    finally:
        service.stop()


async def test_a_replica_streams_what_another_ingested(pg_url: str, tmp_path: Path) -> None:
    records = [tmp_path / "one.jsonl", tmp_path / "two.jsonl"]  # a file per writer
    one, two = (
        ServiceProcess(pg_url, ENV, log=path.with_suffix(".log"), PHASEWATCH_TEST_RECORD=str(path))
        for path in records
    )
    one.start()
    two.start()

    def calls() -> list[list[Any]]:
        return handled(records[0]) + handled(records[1])

    try:
        async with aiohttp.ClientSession() as session:
            reader = asyncio.create_task(read_with_drops(session, two.url, TOTAL, drop_every=45))
            await post_all(session, one.url, FIXTURE)
            streamed = await asyncio.wait_for(reader, 120)
            await wait_until(lambda: len(calls()) >= TOTAL, "every change handled")
            # The replicas share the delivery work: each change handled once by either.
            check_against_handler(streamed, sorted(calls()))
            # The same feed from either replica, page by page.
            async with session.get(f"{one.url}/changes", params={"limit": "1000"}) as r1:
                page_one = await r1.json()
            async with session.get(f"{two.url}/changes", params={"limit": "1000"}) as r2:
                page_two = await r2.json()
            assert page_one == page_two and page_one["changes"] == streamed
    finally:
        one.stop()
        two.stop()


def test_an_unusable_retention_stops_serve_with_one_line(tmp_path: Path) -> None:
    env = {
        **ServiceProcess(tmp_path / "pw.db").env,
        "PHASEWATCH_CHANGES_RETENTION": "a week",
    }
    done = subprocess.run(
        [PHASEWATCH, "serve"], env=env, cwd=REPO, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("phasewatch: PHASEWATCH_CHANGES_RETENTION: must be a time")


async def test_serve_prunes_by_retention_and_answers_410(tmp_path: Path) -> None:
    service = ServiceProcess(
        tmp_path / "pw.db",
        {**ENV, "PHASEWATCH_HANDLERS": ""},
        PHASEWATCH_CHANGES_RETENTION="3",
        PHASEWATCH_CHANGES_RETENTION_INTERVAL_S="0.1",
    ).start()
    try:
        async with aiohttp.ClientSession() as session:
            await post_all(session, service.url, FIXTURE[:40])
            last = (await service_changes(session, service.url, after="now"))["next"]

            async def pruned() -> list[dict[str, Any]] | None:
                page = await service_changes(session, service.url)
                return page["changes"] if len(page["changes"]) == 3 else None

            kept = await wait_until(pruned, "retention to keep the newest 3 changes")
            assert kept[-1]["cursor"] == last
            async with session.get(
                f"{service.url}/changes", params={"after": encode_cursor(1)}
            ) as response:
                assert response.status == 410
                assert (await response.json())["error"] == "gone"
    finally:
        assert service.stop() == 0


async def service_changes(
    session: aiohttp.ClientSession, url: str, **params: str
) -> dict[str, Any]:
    async with session.get(f"{url}/changes", params=params) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body
