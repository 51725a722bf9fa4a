"""Real processes in one consumer group: a member leaves (SIGTERM) or dies (SIGKILL)
mid-stream, the other takes its partitions; every task ends right and the handler sees
each phase change once. Then forward mode: signed webhooks in, through the broker."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from consumer.core.secrets import redact
from tests.kafka.test_consumer import produce, task_key
from tests.kafka_fixtures import KafkaBroker
from tests.process.service_proc import ServiceProcess
from tests.support import deliveries, expected_tasks, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def fetch(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def wait_ready(
    url: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120
) -> dict[str, Any]:
    """The service's /readyz once ``predicate`` holds for it; fails (with the last status)
    when it does not within ``timeout``."""

    async def ready() -> dict[str, Any] | None:
        status: dict[str, Any] = await fetch(f"{url}/readyz")
        return status if predicate(status) else None

    return await wait_until(
        ready, f"/readyz of {url} to satisfy the test", timeout=timeout, interval=0.2
    )


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_member_leaves_mid_stream_other_takes_over(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path, how: str
) -> None:
    db = tmp_path / "shared.db"
    record = tmp_path / "changes.jsonl"
    env = {
        "PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "PHASEWATCH_KAFKA_TOPICS": kafka_topic,
        "PHASEWATCH_KAFKA_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}",
        "PHASEWATCH_KAFKA_MAX_BATCH": "100",
    }
    # Both consume into one store; the survivor also runs the handler.
    leaver = ServiceProcess(db, env).start()
    survivor = ServiceProcess(
        db,
        env,
        PHASEWATCH_HANDLERS="tests.process.recording_handler:record",
        PHASEWATCH_TEST_RECORD=str(record),
    ).start()
    stream = [(task_key(d.body), d.body) for d in deliveries("messy")]
    try:
        # Both members hold partitions before the stream starts.
        for member in (leaver, survivor):
            await wait_ready(member.url, lambda s: len(s["kafka"]["assigned"]) > 0)
        chunk = len(stream) // 8
        for i in range(0, len(stream), chunk):
            await produce(kafka_broker.bootstrap_servers, kafka_topic, stream[i : i + chunk])
            if i == 3 * chunk:
                await wait_ready(leaver.url, lambda s: s["kafka"]["records"] > 0)
                if how == "sigterm":
                    assert leaver.stop() == 0
                else:
                    leaver.kill()
        distinct = len({orjson.loads(v)["id"] for _, v in stream})
        await wait_ready(
            survivor.url, lambda s: s["events"] == distinct and s["pendingChanges"] == 0
        )
        for task_id, task in expected_tasks("messy").items():
            assert await fetch(f"{survivor.url}/tasks/{task_id}") == redact(task)
        seen = [orjson.loads(x) for x in record.read_bytes().splitlines()]
        histories = [
            await fetch(f"{survivor.url}/tasks/{t}/history") for t in expected_tasks("messy")
        ]
        recorded = [c["seq"] for h in histories for c in h["phaseChanges"]]
        # Redelivered records recorded no second change, and the handler saw each once.
        assert sorted(x[0] for x in seen) == sorted(recorded)
        for h in histories:
            phases = [c["phase"] for c in h["phaseChanges"]]
            assert all(a != b for a, b in itertools.pairwise(phases))
    finally:
        if leaver.proc is not None and leaver.proc.poll() is None:
            leaver.stop()
        survivor.stop()


async def test_forward_mode_webhooks_through_the_broker(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    env = {
        "PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "PHASEWATCH_KAFKA_TOPICS": kafka_topic,
        "PHASEWATCH_KAFKA_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}",
        "PHASEWATCH_WEBHOOK_FORWARD": "1",
        "PHASEWATCH_WEBHOOK_SECRET": "whsec_fixture",
        "PHASEWATCH_WEBHOOK_TOLERANCE_S": "0",
    }
    # Two receivers behind a "load balancer", each also a consumer, one shared store.
    db = tmp_path / "fwd.db"
    a = ServiceProcess(db, env).start()
    b = ServiceProcess(db, env).start()
    try:
        stream = list(deliveries("small"))
        async with aiohttp.ClientSession() as session:

            async def send(i: int, d: Any) -> int:
                url = (a if i % 2 else b).url
                async with session.post(
                    f"{url}/webhooks/livepeer",
                    data=d.body,
                    headers={"Livepeer-Signature": d.signature},
                ) as r:
                    body = await r.json()
                    assert body["status"] == "forwarded"
                    return r.status

            statuses = await asyncio.gather(*(send(i, d) for i, d in enumerate(stream)))
            assert set(statuses) == {200}
            bad = await session.post(
                f"{a.url}/webhooks/livepeer",
                data=b"{}",
                headers={"Livepeer-Signature": "t=1,v1=00"},
            )
            assert bad.status == 401  # verified before anything is forwarded
        distinct = len({d.doc["id"] for d in stream})
        await wait_ready(a.url, lambda s: s["events"] == distinct)
        for task_id, task in expected_tasks("small").items():
            assert await fetch(f"{b.url}/tasks/{task_id}") == redact(task)
    finally:
        a.stop()
        b.stop()
