"""SIGKILL in the middle of a stream: what was acknowledged is never lost, and re-sending
what was not (as Livepeer would) ends with every task right."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from consumer.core.secrets import redact
from tests.process.service_proc import ServiceProcess
from tests.support import Delivery, deliveries, expected_changes, expected_tasks, wait_until

pytestmark = pytest.mark.slow
ENV = {"PHASEWATCH_WEBHOOK_SECRET": "whsec_fixture", "PHASEWATCH_WEBHOOK_TOLERANCE_S": "0"}


async def send_all(
    url: str, stream: list[Delivery], *, stop_after: int | None = None, concurrency: int = 16
) -> set[int]:
    """POST deliveries; return the indexes that got a 2xx. Errors are expected mid-crash."""
    acked: set[int] = set()
    queue = list(enumerate(stream))

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            index, d = queue.pop(0)
            try:
                async with session.post(
                    f"{url}/webhooks/livepeer",
                    data=d.body,
                    headers={"Livepeer-Signature": d.signature},
                ) as r:
                    await r.read()
                    if 200 <= r.status < 300:
                        acked.add(index)
            except (TimeoutError, aiohttp.ClientError):
                pass

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return acked


async def fetch(url: str, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url + path) as r:
        return await r.json()


async def no_pending_changes(url: str) -> bool:
    return bool((await fetch(url, "/readyz"))["pendingChanges"] == 0)


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_sigkill_mid_stream_then_resend_unacknowledged(tmp_path: Path, writer: str) -> None:
    stream = list(deliveries("messy"))
    random.Random(7).shuffle(stream)
    db = tmp_path / "crash.db"
    env = {**ENV, "PHASEWATCH_SQLITE_WRITER": writer}
    service = ServiceProcess(db, env).start()
    # A good part of the stream, whatever the fixture's size: a quarter of its events.
    kill_at = max(1, len({d.doc["id"] for d in stream}) // 4)

    async def killer() -> None:
        # Let the stream in until the store shows that part, then pull the plug with
        # requests in flight.
        async def enough() -> bool:
            return bool((await fetch(service.url, "/readyz"))["events"] >= kill_at)

        await wait_until(enough, f"{kill_at} events stored before the kill", timeout=120)
        service.kill()

    acked, _ = await asyncio.gather(send_all(service.url, stream), killer())
    assert 0 < len(acked) < len(stream), "the kill should land mid-stream"

    service = ServiceProcess(db, env, port=service.port).start()
    try:
        ready = await fetch(service.url, "/readyz")
        acked_ids = {stream[i].doc["id"] for i in acked}
        # Everything acknowledged before the kill survived it.
        assert ready["events"] >= len(acked_ids)
        for i in sorted(acked)[:: max(1, len(acked) // 50)]:
            task_id = stream[i].doc["payload"]["task"]["id"]
            history = await fetch(service.url, f"/tasks/{task_id}/history")
            assert stream[i].doc["id"] in {e["eventId"] for e in history["events"]}
        # Livepeer re-sends what it never got a 2xx for.
        rest = [d for i, d in enumerate(stream) if i not in acked]
        assert len(await send_all(service.url, rest)) == len(rest)
        for task_id, task in expected_tasks("messy").items():
            assert await fetch(service.url, f"/tasks/{task_id}") == redact(task)
    finally:
        service.stop()


async def test_changes_reach_handlers_after_a_crash(tmp_path: Path) -> None:
    record = tmp_path / "changes.jsonl"
    env = {
        **ENV,
        "PHASEWATCH_HANDLERS": "tests.process.recording_handler:record",
        "PHASEWATCH_TEST_RECORD": str(record),
    }
    stream = sorted(deliveries("small"), key=Delivery.order_key)
    db = tmp_path / "h.db"
    service = ServiceProcess(db, env).start()
    half = len(stream) // 2
    assert len(await send_all(service.url, stream[:half], concurrency=1)) == half
    service.kill()
    service = ServiceProcess(db, env, port=service.port).start()
    try:
        assert len(await send_all(service.url, stream[half:], concurrency=1)) == len(stream) - half
        await wait_until(
            lambda: no_pending_changes(service.url), "every change delivered", timeout=60
        )
        delivered = {orjson.loads(x)[0] for x in record.read_bytes().splitlines()}
        histories = [
            await fetch(service.url, f"/tasks/{t}/history") for t in expected_tasks("small")
        ]
        recorded = {c["seq"] for h in histories for c in h["phaseChanges"]}
        # At least once: every recorded change reached the handler, none lost to the kill.
        assert delivered == recorded
        assert len(recorded) == sum(len(v) for v in expected_changes("small").values())
    finally:
        service.stop()
