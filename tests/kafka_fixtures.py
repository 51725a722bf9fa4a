"""Pytest plugin: one real Kafka broker per test session, plus fresh topics per test.

Loaded from ``tests/conftest.py`` via ``pytest_plugins = ["tests.kafka_fixtures"]``.

Where the broker comes from, first match wins:

1. ``PHASEWATCH_TEST_KAFKA_BOOTSTRAP=host:port``: an existing broker (not restartable).
2. A Docker engine that answers a ping: testcontainers' ``KafkaContainer`` in KRaft mode
   (image overridable with ``PHASEWATCH_TEST_KAFKA_IMAGE``; not restartable).
3. Otherwise ``deploy/kafka_local.py``: a real Apache Kafka broker run with ``java`` from
   Maven Central jars, on random loopback ports, restartable for outage tests.

``PHASEWATCH_TEST_KAFKA_BACKEND=local|docker`` skips the detection in step 2 (``local`` gives
the restartable broker even where Docker exists); ``PHASEWATCH_TEST_KAFKA_VERSION`` picks the
Kafka version for the local broker.

A broker that cannot be started is an error, never a skip: CI must really run the Kafka tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.core.backoff import Backoff
from consumer.settings import Settings
from consumer.sources.group_commit import ChangeSink
from consumer.sources.kafka.group import STORE_BACKOFF, KafkaSource
from consumer.store.base import IngestStore

ENV_BOOTSTRAP = "PHASEWATCH_TEST_KAFKA_BOOTSTRAP"
ENV_BACKEND = "PHASEWATCH_TEST_KAFKA_BACKEND"
ENV_VERSION = "PHASEWATCH_TEST_KAFKA_VERSION"
ENV_IMAGE = "PHASEWATCH_TEST_KAFKA_IMAGE"

KAFKA_LOCAL_PATH = Path(__file__).resolve().parent.parent / "deploy" / "kafka_local.py"
_MODULE_NAME = "phasewatch_deploy_kafka_local"

# Lines for the end-of-session summary, so CI logs show which broker ran and how long it took.
_SUMMARY: list[str] = []


def load_kafka_local() -> ModuleType:
    """Import ``deploy/kafka_local.py`` by path: ``deploy/`` is scripts, not a package."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, KAFKA_LOCAL_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {KAFKA_LOCAL_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


class KafkaBroker:
    """What tests get from ``kafka_broker``: an address, and lifecycle control when it is ours."""

    def __init__(self, bootstrap_servers: str, kind: str, local: Any = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.kind = kind  # "external", "docker" or "local"
        self._local = local  # deploy/kafka_local.py's LocalKafka, when kind == "local"

    @property
    def can_restart(self) -> bool:
        return self._local is not None

    @property
    def running(self) -> bool:
        return self._local.running if self._local is not None else True

    def _owned(self) -> Any:
        if self._local is None:
            raise RuntimeError(
                f"the {self.kind} Kafka broker is not controlled by the tests; "
                "check kafka_broker.can_restart first"
            )
        return self._local

    def start(self, timeout: float = 90) -> None:
        """Start again after ``stop()``/``kill()``; same address, same data."""
        self._owned().start(timeout)

    def stop(self, timeout: float = 30) -> None:
        """Clean broker shutdown (SIGTERM)."""
        self._owned().stop(timeout)

    def kill(self) -> None:
        """Crash the broker (SIGKILL)."""
        self._owned().kill()

    def restart(self, timeout: float = 90) -> None:
        """Clean stop + start on the same ports and data dir."""
        self._owned().restart(timeout)

    def ensure_running(self) -> None:
        """Bring our broker back if a test left it stopped; no-op for others."""
        if self._local is not None and not self._local.running:
            self._local.start()

    def log_tail(self, lines: int = 40) -> str:
        if self._local is None:
            return f"(no log: {self.kind} broker)"
        tail: str = self._local.log_tail(lines)
        return tail

    def __repr__(self) -> str:
        return f"KafkaBroker({self.kind}, {self.bootstrap_servers})"


def _docker_answers(timeout: float = 3.0) -> bool:
    # The docker CLI (or SDK) being installed proves nothing; only a daemon that answers does.
    try:
        # Imported dynamically: docker ships no type stubs and the repo's mypy config does not
        # exempt it; only two calls are made.
        docker = importlib.import_module("docker")
        client = docker.from_env(timeout=int(timeout))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _docker_broker() -> Iterator[KafkaBroker]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.13 kept it at the old location
        from testcontainers.kafka import KafkaContainer

    image = os.environ.get(ENV_IMAGE) or "confluentinc/cp-kafka:7.6.0"
    t0 = time.monotonic()
    container = KafkaContainer(image).with_kraft()
    container.start(timeout=180)
    try:
        bootstrap = container.get_bootstrap_server()
        _SUMMARY.append(f"docker {image} at {bootstrap}, up in {time.monotonic() - t0:.1f}s")
        yield KafkaBroker(bootstrap, "docker")
    finally:
        container.stop()


def _local_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    kafka_local = load_kafka_local()
    version = os.environ.get(ENV_VERSION) or kafka_local.DEFAULT_VERSION
    t0 = time.monotonic()
    kafka_local.ensure_jars(version)  # timed separately: the cold fetch is the slow part
    t_jars = time.monotonic() - t0
    # The log lives in pytest's basetemp (kept for the last runs) so it survives the broker's
    # temporary data dir and can be inspected or archived after a CI failure.
    log_path = tmp_path_factory.mktemp("kafka") / "broker.log"
    broker = kafka_local.LocalKafka(version, log_path=log_path)
    try:
        t1 = time.monotonic()
        broker.start(timeout=90)
        _SUMMARY.append(
            f"local Kafka {version} at {broker.bootstrap_servers}: jars {t_jars:.1f}s, "
            f"start {time.monotonic() - t1:.1f}s, log {log_path}"
        )
        yield KafkaBroker(broker.bootstrap_servers, "local", broker)
    finally:
        broker.close()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A running Kafka broker for the whole session (see the module docstring for sources)."""
    external = os.environ.get(ENV_BOOTSTRAP, "").strip()
    if external:
        _SUMMARY.append(f"external broker at {external}")
        yield KafkaBroker(external, "external")
        return
    backend = os.environ.get(ENV_BACKEND, "auto").strip().lower()
    if backend not in {"auto", "local", "docker"}:
        raise pytest.UsageError(f"{ENV_BACKEND} must be auto, local or docker, not {backend!r}")
    if backend == "docker" and not _docker_answers():
        raise RuntimeError(f"{ENV_BACKEND}=docker, but no Docker engine answers a ping")
    if backend == "docker" or (backend == "auto" and _docker_answers()):
        yield from _docker_broker()
    else:
        yield from _local_broker(tmp_path_factory)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever needs the broker is a Kafka test, marked or not: `-m "not kafka"` (make
    # test-fast) must never start one.
    for item in items:
        if "kafka_broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(autouse=True)
def _kafka_broker_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    # A failing outage test could leave the session broker down and fail every later Kafka
    # test for the wrong reason; after any test that used it, bring it back. Looked up during
    # setup (the test needs it anyway), so teardown only touches an already-built fixture.
    broker: KafkaBroker | None = (
        request.getfixturevalue("kafka_broker") if "kafka_broker" in request.fixturenames else None
    )
    yield
    if broker is not None:
        broker.ensure_running()


# --------------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------------


async def create_topic(
    bootstrap_servers: str,
    name: str,
    partitions: int = 3,
    replication_factor: int = 1,
    wait_s: float = 30,
) -> None:
    """Create ``name`` and wait until every partition has a leader, so tests never race it."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=int(wait_s * 1000)
    )
    await admin.start()
    try:
        resp = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)],
            timeout_ms=int(wait_s * 1000),
        )
        # aiokafka returns per-topic error codes instead of raising.
        for topic, error_code, *rest in resp.topic_errors:
            if error_code:
                raise RuntimeError(f"creating topic {topic!r} failed: code {error_code} {rest}")
        deadline = time.monotonic() + wait_s
        while True:
            topics = await admin.describe_topics([name])
            parts = topics[0]["partitions"] if topics and not topics[0]["error_code"] else []
            if len(parts) == partitions and all(
                p["leader"] >= 0 and not p["error_code"] for p in parts
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r} has no leaders after {wait_s}s: {topics}")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def delete_topic(bootstrap_servers: str, name: str, wait_s: float = 10) -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=int(wait_s * 1000)
    )
    await admin.start()
    try:
        await admin.delete_topics([name], timeout_ms=int(wait_s * 1000))
    finally:
        await admin.close()


def unique_topic_name(prefix: str = "pw-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def kafka_topic_factory(
    kafka_broker: KafkaBroker,
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """``await make(partitions=3, prefix="pw-test")`` -> a new topic, deleted after the test."""
    created: list[str] = []

    async def make(partitions: int = 3, prefix: str = "pw-test") -> str:
        kafka_broker.ensure_running()
        name = unique_topic_name(prefix)
        await create_topic(kafka_broker.bootstrap_servers, name, partitions)
        created.append(name)
        return name

    yield make
    if created:
        kafka_broker.ensure_running()
    for name in created:
        # Hygiene only (matters on a shared external broker): never fail a test over it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(delete_topic(kafka_broker.bootstrap_servers, name), 15)


@pytest.fixture
async def kafka_topic(kafka_topic_factory: Callable[..., Awaitable[str]]) -> str:
    """A fresh, uniquely named topic with 3 partitions on the session broker."""
    return await kafka_topic_factory(partitions=3)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _SUMMARY:
        terminalreporter.write_line(f"kafka: {line}")


def kafka_source(
    store: IngestStore,
    settings: Settings,
    *,
    on_changes: ChangeSink | None = None,
    backoff: Backoff = STORE_BACKOFF,
) -> KafkaSource:
    """The consumer-group source as the service builds it from ``settings``."""
    return KafkaSource(
        store,
        settings.kafka_connection(),
        settings.kafka_source(),
        on_changes=on_changes,
        backoff=backoff,
    )
