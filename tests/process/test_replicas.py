"""Several ``phasewatch serve`` replicas on one PostgreSQL database, one of them SIGKILLed
mid-stream: webhooks behind a round-robin "load balancer" that retries on another replica
what got no 2xx (as Livepeer would), then Kafka consumers in one group. Every live replica
shows every task right, and the handler saw each change in the outbox once, a redelivery
only with the same idempotency key, from a replica that died before recording it."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from consumer.core.change import ChangeRecord
from consumer.core.secrets import redact
from consumer.store.postgres.store import PostgresStore
from tests.kafka.test_consumer import produce, task_key
from tests.kafka_fixtures import KafkaBroker
from tests.process.service_proc import ServiceProcess
from tests.support import Delivery, deliveries, expected_tasks, wait_until

pytestmark = pytest.mark.slow

HANDLER = "tests.process.replica_handler:record"
SIGNED = {"PHASEWATCH_WEBHOOK_SECRET": "whsec_fixture", "PHASEWATCH_WEBHOOK_TOLERANCE_S": "0"}


@dataclass(frozen=True)
class Call:
    """One handler call, as tests/process/replica_handler.py wrote it."""

    seq: int
    task_id: str
    event_id: str
    previous_phase: str | None
    phase: str
    key: str
    pid: int

    @property
    def change(self) -> tuple[int, str, str, str | None, str]:
        return (self.seq, self.task_id, self.event_id, self.previous_phase, self.phase)


def replica(pg_url: str, tmp_path: Path, name: str, env: dict[str, str]) -> ServiceProcess:
    """A replica on ``pg_url`` with the recording handler, calls in ``<name>.calls``."""
    return ServiceProcess(
        pg_url,
        env,
        log=tmp_path / f"{name}.log",
        PHASEWATCH_HANDLERS=HANDLER,
        PHASEWATCH_TEST_CALLS=str(tmp_path / f"{name}.calls"),
    )


def calls_of(service: ServiceProcess) -> list[Call]:
    """The calls a replica's handler recorded: whole lines only (a SIGKILL may cut one)."""
    try:
        data = Path(service.env["PHASEWATCH_TEST_CALLS"]).read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")[:-1]  # the part after the last newline is not a whole line
    return [Call(*orjson.loads(line)) for line in lines]


def all_calls(services: Iterable[ServiceProcess]) -> list[Call]:
    return [c for s in services for c in calls_of(s)]


async def outbox(pg_url: str) -> list[ChangeRecord]:
    """Every change the replicas recorded, read from the database itself."""
    store = PostgresStore(pg_url, pool_size=2)
    await store.open()
    try:
        records: list[ChangeRecord] = []
        while batch := await store.changes_after(records[-1].seq if records else 0, 500):
            records.extend(batch)
        return records
    finally:
        await store.close()


async def fetch(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def readyz(service: ServiceProcess) -> dict[str, Any]:
    status: dict[str, Any] = await fetch(f"{service.url}/readyz")
    return status


async def leader_of(services: Sequence[ServiceProcess]) -> ServiceProcess | None:
    """The replica holding the dispatch lease, if one does."""
    for service in services:
        if (await readyz(service)).get("dispatch", {}).get("leader"):
            return service
    return None


@dataclass(frozen=True)
class NotYet:
    """A falsy answer to a wait that says what is still missing (wait_until shows it)."""

    what: str

    def __bool__(self) -> bool:
        return False


async def all_delivered(
    pg_url: str, live: Sequence[ServiceProcess], services: Sequence[ServiceProcess]
) -> bool | NotYet:
    """Every change in the outbox reached the handler of one of ``services``, and the
    ``live`` ones have none left to deliver."""
    # One dispatcher (a lease) or several (lanes): every live one has caught up.
    statuses = [await readyz(s) for s in live]
    if not any(s.get("dispatch", {}).get("leader") for s in statuses):
        return NotYet("no live replica dispatches")
    pending = sum(s["pendingChanges"] for s in statuses)
    wanted = {r.seq for r in await outbox(pg_url)}
    missing = wanted - {c.seq for c in all_calls(services)}
    if pending or missing or not wanted:
        return NotYet(
            f"{pending} changes pending; {len(missing)} of {len(wanted)} never handled,"
            f" e.g. {sorted(missing)[:10]}"
        )
    return True


def check_handler_calls(calls: list[Call], records: list[ChangeRecord], victim_pid: int) -> None:
    """Each recorded change reached the handler once; twice only with the same
    idempotency key, the first call made by the killed replica (which died before it
    could record the delivery). The changes delivered are the outbox, no more, no less."""
    by_seq: dict[int, list[Call]] = defaultdict(list)
    for call in calls:
        by_seq[call.seq].append(call)
    assert {c.change for c in calls} == {
        (r.seq, r.task_id, r.event_id, r.previous_phase, r.phase) for r in records
    }
    for seq, seen in by_seq.items():
        if len(seen) > 1:
            assert len({c.key for c in seen}) == 1, f"seq {seq} redelivered under a new key"
            assert len({c.change for c in seen}) == 1, f"seq {seq} redelivered changed"
            assert victim_pid in {c.pid for c in seen}, f"seq {seq} handled twice: {seen}"
    # One key per change: a key never names two changes.
    assert len({c.key for c in calls}) == len(by_seq)
    # Per task the recorded changes chain (no change recorded twice by two replicas) and
    # end in the task's phase.
    chains: dict[str, list[ChangeRecord]] = defaultdict(list)
    for record in records:
        chains[record.task_id].append(record)
    expected = expected_tasks("messy")
    for task_id, chain in chains.items():
        for before, after in itertools.pairwise(chain):
            assert after.previous_phase == before.phase, (task_id, before, after)
        assert chain[-1].phase == expected[task_id]["status"]["phase"], task_id


async def assert_tasks_on(services: Sequence[ServiceProcess]) -> None:
    for task_id, task in expected_tasks("messy").items():
        for service in services:
            assert await fetch(f"{service.url}/tasks/{task_id}") == redact(task), (
                task_id,
                service.url,
            )


async def send_round_robin(
    services: Sequence[ServiceProcess], stream: Sequence[Delivery], *, concurrency: int = 12
) -> tuple[int, int]:
    """POST each delivery to the next replica in turn; a delivery that gets no 2xx (a
    refused connection, a reset, a 5xx) goes to the next one, until one takes it.
    Returns (deliveries sent, attempts that got no 2xx)."""
    indexes = iter(range(len(stream)))
    failed = 0

    async def deliver(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal failed
        d = stream[index]
        for attempt in range(4 * len(services)):
            service = services[(index + attempt) % len(services)]
            try:
                async with session.post(
                    f"{service.url}/webhooks/livepeer",
                    data=d.body,
                    headers={"Livepeer-Signature": d.signature},
                ) as r:
                    await r.read()
                    if 200 <= r.status < 300:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            failed += 1
        raise AssertionError(f"delivery {index} got no 2xx from any replica")

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in indexes:
            await deliver(session, index)

    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return len(stream), failed


async def kill_when(
    ready: Callable[[], Awaitable[bool]], services: Sequence[ServiceProcess], what: str
) -> ServiceProcess:
    """Once ``ready``, SIGKILL the replica holding the dispatch lease (so the kill lands
    mid-dispatch too); return it."""
    await wait_until(ready, what, timeout=180, interval=0.05)
    victim = await wait_until(lambda: leader_of(services), "a dispatch leader", timeout=60)
    victim.kill()
    return victim


async def test_three_replicas_on_one_database_one_killed_mid_stream(
    pg_url: str, tmp_path: Path
) -> None:
    stream = list(deliveries("messy"))
    distinct = len({d.doc["id"] for d in stream})
    services = [replica(pg_url, tmp_path, f"r{i}", SIGNED) for i in range(3)]
    try:
        for service in services:
            service.start()

        async def a_third_in_and_handled() -> bool:
            # A third of the events stored and the handler under way: a kill mid-stream.
            status = await readyz(services[0])
            return status["events"] >= distinct // 3 and bool(all_calls(services))

        sender = asyncio.create_task(send_round_robin(services, stream))
        victim = await kill_when(a_third_in_and_handled, services, "a third of the stream in")
        assert not sender.done(), "the kill should land mid-stream"
        sent, failed = await sender
        assert sent == len(stream) and failed > 0
        assert victim.proc is not None
        victim_pid = victim.proc.pid
        live = [s for s in services if s is not victim]

        stats = await readyz(live[0])
        assert stats["events"] == distinct
        await wait_until(
            lambda: all_delivered(pg_url, live, services),
            "every change delivered after the kill",
            timeout=120,
        )
        await assert_tasks_on(live)
        check_handler_calls(all_calls(services), await outbox(pg_url), victim_pid)
    finally:
        for service in services:
            if service.proc is not None and service.proc.poll() is None:
                service.stop()


@pytest.mark.kafka
async def test_two_consumers_on_one_database_one_killed_mid_stream(
    pg_url: str,
    kafka_broker: KafkaBroker,
    kafka_topic_factory: Callable[..., Awaitable[str]],
    tmp_path: Path,
) -> None:
    topic = await kafka_topic_factory(partitions=4, prefix="pw-replicas")
    env = {
        "PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "PHASEWATCH_KAFKA_TOPICS": topic,
        "PHASEWATCH_KAFKA_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}",
        "PHASEWATCH_KAFKA_MAX_BATCH": "100",
    }
    services = [replica(pg_url, tmp_path, f"k{i}", env) for i in range(2)]
    stream = [(task_key(d.body), d.body) for d in deliveries("messy")]
    distinct = len({orjson.loads(v)["id"] for _, v in stream})
    try:
        for service in services:
            service.start()

        async def both_assigned() -> bool:
            return all([len((await readyz(s))["kafka"]["assigned"]) > 0 for s in services])

        # Both members own partitions before the stream starts.
        await wait_until(both_assigned, "both consumers assigned partitions", timeout=120)
        chunk = len(stream) // 8
        victim: ServiceProcess | None = None
        for i in range(0, len(stream), chunk):
            await produce(kafka_broker.bootstrap_servers, topic, stream[i : i + chunk])
            if i == 3 * chunk:
                leader = await wait_until(lambda: leader_of(services), "a dispatch leader")

                async def leader_consumed(leader: ServiceProcess = leader) -> bool:
                    status = await readyz(leader)
                    return status["kafka"]["records"] > 0 and bool(calls_of(leader))

                victim = await kill_when(leader_consumed, [leader], "the leader consuming")
        assert victim is not None and victim.proc is not None
        victim_pid = victim.proc.pid
        (survivor,) = [s for s in services if s is not victim]

        async def all_in() -> bool:
            status = await readyz(survivor)
            return status["events"] == distinct and len(status["kafka"]["assigned"]) == 4

        await wait_until(all_in, "the survivor to take every partition and event", timeout=180)
        await wait_until(
            lambda: all_delivered(pg_url, [survivor], services),
            "every change delivered",
            timeout=120,
        )
        await assert_tasks_on([survivor])
        check_handler_calls(all_calls(services), await outbox(pg_url), victim_pid)
    finally:
        for service in services:
            if service.proc is not None and service.proc.poll() is None:
                service.stop()
