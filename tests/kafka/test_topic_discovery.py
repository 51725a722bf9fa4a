"""Topics that do not exist yet, on a broker that does not create them by itself (as
production brokers run: ``auto.create.topics.enable=false``). The session broker creates
topics on demand, which would hide the problem, so this module starts a broker of its own
the way ``make kafka`` does: ``deploy/kafka_local.py start`` with ``--create-topic``, plus
``--override auto.create.topics.enable=false``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumer.settings import Settings
from consumer.store.sqlite.store import SQLiteStore
from tests.kafka.test_consumer import assert_expected, distinct_events, produce, task_key
from tests.kafka_fixtures import (
    ENV_VERSION,
    KAFKA_LOCAL_PATH,
    create_topic,
    kafka_source,
    load_kafka_local,
)
from tests.support import deliveries, wait_until, wait_until_sync

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# What `make kafka` passes.
DEFAULT_TOPICS = {"livepeer.task-events": 4, "livepeer.task-events.dlq": 1}
# "Within seconds of its creation": the default metadata refresh is 5 s, plus a rebalance.
PICKED_UP_WITHIN_S = 20


@dataclass
class StrictBroker:
    bootstrap_servers: str
    port: int
    stderr: Path


@pytest.fixture(scope="module")
def strict_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrictBroker]:
    """``kafka_local.py start`` as ``make kafka`` runs it, with topic auto-creation off."""
    kafka_local = load_kafka_local()
    version = os.environ.get(ENV_VERSION) or kafka_local.DEFAULT_VERSION
    kafka_local.ensure_jars(version)  # a cold fetch is not the start-up being waited for
    tmp = tmp_path_factory.mktemp("strict-kafka")
    out, err = tmp / "stdout", tmp / "stderr"
    creates = [
        arg for name, n in DEFAULT_TOPICS.items() for arg in ("--create-topic", f"{name}:{n}")
    ]
    cmd = [
        sys.executable, str(KAFKA_LOCAL_PATH), "start", "--version", version,
        "--port", "0", "--data-dir", str(tmp / "data"),
        "--override", "auto.create.topics.enable=false", *creates,
    ]  # fmt: skip
    with out.open("wb") as stdout, err.open("wb") as stderr:
        # Killed should pytest die first (as the module's JVMs are); fixtures run on the
        # main thread, where the hook is safe (it only calls a pre-resolved prctl).
        proc = subprocess.Popen(
            cmd,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=kafka_local._pdeathsig_preexec,  # noqa: PLW1509
        )
    try:

        def address() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"kafka_local.py exited {proc.returncode}: {err.read_text()}")
            prefix = f"{kafka_local.BOOTSTRAP_ENV}="
            lines = [ln for ln in out.read_text().splitlines() if ln.startswith(prefix)]
            return lines[0].removeprefix(prefix) if lines else None

        bootstrap = wait_until_sync(address, "kafka_local.py to print the address", timeout=120)
        yield StrictBroker(bootstrap, int(bootstrap.rpartition(":")[2]), err)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def describe(bootstrap: str, topics: list[str]) -> dict[str, tuple[int, int]]:
    """topic -> (error code, partition count), as the brokers say."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        found = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {t["topic"]: (t["error_code"], len(t["partitions"])) for t in found}


async def test_start_creates_the_default_topics(strict_broker: StrictBroker) -> None:
    # Printed before the address, so they exist once the address is out.
    printed = strict_broker.stderr.read_text()
    assert "topic livepeer.task-events: created, 4 partitions" in printed
    assert "topic livepeer.task-events.dlq: created, 1 partition\n" in printed
    described = await describe(strict_broker.bootstrap_servers, list(DEFAULT_TOPICS))
    assert described == {name: (0, n) for name, n in DEFAULT_TOPICS.items()}
    # Asked again (a restart on a kept --data-dir): left as they are, and said so.
    kafka_local = load_kafka_local()
    again = kafka_local.create_topics(strict_broker.port, list(DEFAULT_TOPICS.items()))
    assert again == {name: False for name in DEFAULT_TOPICS}


async def test_topic_created_after_start_is_consumed_within_seconds(
    strict_broker: StrictBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="consumer.sources.kafka.group")
    topic = f"pw-late-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        kafka_bootstrap_servers=strict_broker.bootstrap_servers,
        kafka_topics=topic,
        kafka_group_id=f"g-{uuid.uuid4().hex[:8]}",
    )  # the default metadata refresh: what `serve` runs with
    store = SQLiteStore(tmp_path / "late.db")
    await store.open()
    source = kafka_source(store, settings)
    await source.start()
    try:
        # In its group with nothing to consume: ready, and /readyz names the missing topic.
        await wait_until(lambda: source.status()["joined"], "the member to join", timeout=60)
        status = source.status()
        assert status["missingTopics"] == [topic]
        assert status["assigned"] == [] and not status["joinOverdue"] and not status["failed"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert [w for w in warnings if w.startswith("waiting for topic")] == [
            f"waiting for topic {topic} to be created: not on the brokers yet; consumed "
            "within about 5 s of its creation (PHASEWATCH_KAFKA_METADATA_MAX_AGE_S)"
        ]
        # Subscribing did not create it: the broker really leaves that to us.
        assert (await describe(strict_broker.bootstrap_servers, [topic]))[topic][0] != 0

        await create_topic(strict_broker.bootstrap_servers, topic, partitions=2)
        stream = deliveries("small")
        await produce(
            strict_broker.bootstrap_servers, topic, [(task_key(d.body), d.body) for d in stream]
        )

        async def all_stored() -> bool:
            return (await store.stats()).events == distinct_events("small")

        await wait_until(
            all_stored, "the new topic's records in the store", timeout=PICKED_UP_WITHIN_S
        )
        await assert_expected(store, "small")
        assert len(source.status()["assigned"]) == 2
        # The watch looks at the consumer's metadata twice a second: soon, not at once.
        await wait_until(
            lambda: source.status()["missingTopics"] == [], "the topic to be found", timeout=5
        )
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert f"topic {topic} was created (2 partitions): consuming it" in infos
    finally:
        await source.stop()
        await store.close()
