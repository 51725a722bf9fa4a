"""Shared pytest fixtures: the shared fixture streams, store backends, a running service.

Tiers (see the README): ``tests/unit`` is pure, ``tests/http`` runs the app in-process,
``tests/process`` spawns real ``phasewatch`` processes, ``tests/kafka`` needs the real
broker that ``tests.kafka_fixtures`` starts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from hypothesis import HealthCheck, settings

from consumer.memory_store import MemoryStore
from consumer.sqlite_process import SQLiteProcessStore
from consumer.sqlite_store import SQLiteStore
from consumer.store import RawIngestResult, Store

pytest_plugins = ["tests.kafka_fixtures"]

# The machines are small and shared with a broker: judge properties, not speed.
settings.register_profile("phasewatch", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("phasewatch")


class PlannedProcessStore(SQLiteProcessStore):
    """The writer process store as the Kafka consumer drives it: every batch decoded and
    folded in this process, the writer process only checking and writing the plan."""

    async def ingest_raw(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
        decode_here: bool = True,
    ) -> RawIngestResult:
        return await super().ingest_raw(
            raws, source, received_at, record_changes=record_changes, decode_here=decode_here
        )


@pytest.fixture(params=["memory", "sqlite", "sqlite-process", "sqlite-planned"])
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Store]:
    """Every backend, opened; one behaviour suite runs against each."""
    backend: Store
    if request.param == "memory":
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
