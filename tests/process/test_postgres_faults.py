"""PostgreSQL faults against a real ``phasewatch serve``: a database that is not there at
start (one line, exit 2, no password), ``phasewatch migrate``, and a server that goes
away while serving: webhooks get 503 (Livepeer retries), ``/readyz`` says not ready, and
when the server is back both recover by themselves, with nothing accepted lost; on Kafka,
records produced meanwhile wait (the batch stalls and retries) and are all materialized.

The server is the session's (``pg_server``): each test that stops it starts it again in
a ``finally``."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from consumer.core.secrets import redact
from consumer.store.postgres.migrations import MIGRATIONS
from tests.kafka.test_consumer import produce, task_key
from tests.kafka_fixtures import KafkaBroker
from tests.pg_fixtures import PostgresServer
from tests.process.service_proc import PHASEWATCH, ServiceProcess, free_port
from tests.support import REPO, deliveries, expected_tasks, snapshot, wait_until, wait_until_sync
from tests.support import webhook_body as body_of

pytestmark = pytest.mark.slow

HOOK = "/webhooks/livepeer"
PASSWORD = "s3cr3t-Pa55word"  # planted, to show it never leaves


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHASEWATCH, *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # the status is what the tests look at
    )


def test_database_down_at_start_is_one_line_without_the_password(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    url = f"postgresql://phasewatch:{PASSWORD}@127.0.0.1:{closed}/phasewatch"
    err = tmp_path / "stderr"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PHASEWATCH_DATABASE_URL": url,
        "PHASEWATCH_HTTP_HOST": "127.0.0.1",
        "PHASEWATCH_HTTP_PORT": str(free_port()),
    }
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [PHASEWATCH, "serve"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        # Seconds: a refused connection is not retried until some timeout.
        wait_until_sync(lambda: proc.poll() is not None, "serve to exit", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    text = err.read_text()
    assert proc.returncode == 2, text
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("phasewatch: PHASEWATCH_DATABASE_URL"), text
    assert PASSWORD not in text
    assert str(closed) in lines[0]  # which server it could not reach


def test_migrate_applies_the_steps_once(pg_url: str, tmp_path: Path) -> None:
    first = run(tmp_path, "migrate", PHASEWATCH_DATABASE_URL=pg_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"applied schema {step.version}: {step.name}" for step in MIGRATIONS
    ]
    again = run(tmp_path, "migrate", PHASEWATCH_DATABASE_URL=pg_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["the schema is up to date"]


def request(service: ServiceProcess, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """``GET`` (or ``POST body``) ``path``: the status and the JSON answer, whatever the
    status; (0, reason) when no answer came (a refused connection, a timeout)."""
    method = "GET" if body is None else "POST"
    req = urllib.request.Request(f"{service.url}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError as exc:
        return 0, repr(exc)


def restartable(pg_server: PostgresServer) -> PostgresServer:
    if not pg_server.can_restart:
        pytest.fail("this test needs the server the fixtures started (not an external one)")
    return pg_server


def log_tail(service: ServiceProcess, lines: int = 30) -> str:
    return "\n".join(service.log.read_text(errors="replace").splitlines()[-lines:])


def test_database_down_while_serving_is_503_then_recovers(
    pg_server: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    server = restartable(pg_server)
    service = ServiceProcess(pg_url, log=tmp_path / "pw.log").start()

    def event(i: int) -> bytes:
        return body_of(f"e{i}", snapshot("T-outage", "running", 1000 + i, note=f"n{i}"))

    accepted: list[str] = []
    try:
        for i in range(5):
            status, answer = request(service, HOOK, event(i))
            assert status == 200, answer
            accepted.append(f"e{i}")
        server.stop()
        try:
            status, answer = request(service, HOOK, event(5))
            assert status == 503, (status, answer, log_tail(service))
            assert answer["error"] == "store_unavailable" and "retry" in answer["message"]
            status, ready = request(service, "/readyz")
            assert status == 503, (status, ready, log_tail(service))
            assert service.proc is not None and service.proc.poll() is None
        finally:
            server.start()

        # Livepeer retries the one that got 503: once the server is back, it is taken.
        def taken() -> bool:
            status, _ = request(service, HOOK, event(5))
            return 200 <= status < 300

        wait_until_sync(taken, "a webhook to get a 2xx after the restart", timeout=60)
        accepted.append("e5")
        wait_until_sync(
            lambda: request(service, "/readyz")[0] == 200, "/readyz 200 after the restart"
        )
        for i in range(6, 9):
            status, answer = request(service, HOOK, event(i))
            assert status == 200, answer
            accepted.append(f"e{i}")
        status, history = request(service, "/tasks/T-outage/history")
        assert status == 200, history
        assert [e["eventId"] for e in history["events"]] == accepted
        status, task = request(service, "/tasks/T-outage")
        assert status == 200 and task["note"] == "n8"
    finally:
        server.ensure_running()
        service.stop()


def log_has(service: ServiceProcess, text: str, after: int) -> bool:
    return text in service.log.read_text(errors="replace")[after:]


@pytest.mark.kafka
async def test_kafka_records_wait_out_the_database_and_all_land(
    pg_server: PostgresServer,
    pg_url: str,
    kafka_broker: KafkaBroker,
    kafka_topic_factory: Callable[..., Awaitable[str]],
    tmp_path: Path,
) -> None:
    server = restartable(pg_server)
    topic = await kafka_topic_factory(partitions=3, prefix="pw-pg-down")
    service = ServiceProcess(
        pg_url,
        log=tmp_path / "pw.log",
        PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS=kafka_broker.bootstrap_servers,
        PHASEWATCH_KAFKA_TOPICS=topic,
        PHASEWATCH_KAFKA_GROUP_ID=f"g-{uuid.uuid4().hex[:8]}",
        PHASEWATCH_KAFKA_MAX_BATCH="100",
    ).start()
    stream = [(task_key(d.body), d.body) for d in deliveries("messy")]
    half = len(stream) // 2
    ids = [orjson.loads(v)["id"] for _, v in stream]

    async def fetch(path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(service.url + path) as r:
            return await r.json()

    async def events_stored(n: int) -> bool:
        status = await fetch("/readyz")
        return bool(status.get("events") == n)

    try:
        await produce(kafka_broker.bootstrap_servers, topic, stream[:half])
        await wait_until(
            lambda: events_stored(len(set(ids[:half]))), "the first half stored", timeout=120
        )
        mark = len(service.log.read_text(errors="replace"))
        server.stop()
        try:
            await produce(kafka_broker.bootstrap_servers, topic, stream[half:])
            # The consumer has the records and cannot store them: its batch stalls.
            await wait_until(
                lambda: log_has(service, "store could not commit a batch", mark),
                "a Kafka batch to fail against the stopped database",
                timeout=60,
            )
            assert await readyz_is(service, 503), log_tail(service)
            assert service.proc is not None and service.proc.poll() is None
        finally:
            server.start()
        await wait_until(
            lambda: events_stored(len(set(ids))),
            "every record stored after the restart",
            timeout=180,
        )
        await wait_until(lambda: readyz_is(service, 200), "/readyz 200 again", timeout=60)
        seen: set[str] = set()
        for task_id, task in expected_tasks("messy").items():
            assert await fetch(f"/tasks/{task_id}") == redact(task)
            history = await fetch(f"/tasks/{task_id}/history")
            seen.update(e["eventId"] for e in history["events"])
        assert set(ids) <= seen  # the records produced while the database was down too
    finally:
        server.ensure_running()
        service.stop()


async def readyz_is(service: ServiceProcess, status: int) -> bool:
    async with aiohttp.ClientSession() as s, s.get(service.url + "/readyz") as r:
        return r.status == status
