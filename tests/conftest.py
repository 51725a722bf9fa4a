"""Shared pytest fixtures: the shared fixture streams, store backends, a running service.

Tiers (see the README): ``tests/unit`` is pure, ``tests/http`` runs the app in-process,
``tests/process`` spawns real ``phasewatch`` processes, ``tests/kafka`` needs the real
broker that ``tests.kafka_fixtures`` starts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from consumer.core.receipt import Receipt
from consumer.store.base import RawIngestResult, Store
from consumer.store.memory import MemoryStore
from consumer.store.postgres.store import PostgresStore
from consumer.store.sqlite.process import SQLiteProcessStore
from consumer.store.sqlite.store import SQLiteStore

pytest_plugins = ["tests.kafka_fixtures", "tests.pg_fixtures"]

# The machines are small and shared with a broker: judge properties, not speed.
settings.register_profile("phasewatch", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("phasewatch")


class PlannedProcessStore(SQLiteProcessStore):
    """The writer process store as the Kafka consumer drives it, with every key folded in
    this process: the writer process only checks and writes the plans."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, fold_here=1.0)

    async def ingest_raw(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
        keys: Sequence[bytes | None] | None = None,
        receipts: Sequence[Receipt | None] | None = None,
    ) -> RawIngestResult:
        return await super().ingest_raw(
            raws,
            source,
            received_at,
            record_changes=record_changes,
            keys=[b"k"] * len(raws) if keys is None else keys,
            receipts=receipts,
        )


# The writer-process backends start a child process per test: the `slow` tier (spawns
# processes), so `make test-fast` runs the suite against the in-process backends only.
_SPAWNS = pytest.mark.slow


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("sqlite-process", marks=_SPAWNS),
        pytest.param("sqlite-planned", marks=_SPAWNS),
        "postgres",
    ]
)
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Store]:
    """Every backend, opened; one behaviour suite runs against each."""
    backend: Store
    if request.param == "postgres":
        server = request.getfixturevalue("pg_server")
        server.ensure_running()
        backend = PostgresStore(await server.create_database())
    elif request.param == "memory":
        backend = MemoryStore()
    elif request.param == "sqlite-process":
        backend = SQLiteProcessStore(tmp_path_factory.mktemp("db") / "phasewatch.db")
    elif request.param == "sqlite-planned":
        backend = PlannedProcessStore(tmp_path_factory.mktemp("db") / "phasewatch.db")
    else:
        backend = SQLiteStore(tmp_path_factory.mktemp("db") / "phasewatch.db")
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
def sqlite_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], str]:
    def make() -> str:
        return str(tmp_path_factory.mktemp("db") / "phasewatch.db")

    return make
