"""A real PostgreSQL server for the tests, and a fresh database per test.

Loaded from ``tests/conftest.py`` via ``pytest_plugins``. Where the server comes from, in
order:

1. ``PHASEWATCH_TEST_DATABASE_URL``: an existing server (its user may create databases);
2. a Docker engine that answers: testcontainers' ``PostgresContainer``;
3. otherwise ``deploy/postgres_local.py``: the machine's PostgreSQL binaries
   (``.ci/run`` installs the server package when it is missing).

Never skipped: a test that needs PostgreSQL fails when none can be had.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest

from tests.kafka_fixtures import _docker_answers

ENV_URL = "PHASEWATCH_TEST_DATABASE_URL"
_LOCAL_PATH = Path(__file__).resolve().parent.parent / "deploy" / "postgres_local.py"


def load_postgres_local() -> ModuleType:
    """Import ``deploy/postgres_local.py`` by path: ``deploy/`` is scripts, not a package."""
    name = "phasewatch_deploy_postgres_local"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _LOCAL_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class PostgresServer:
    """What tests get from ``pg_server``: an admin URL, databases, and (when the server
    is ours) stop and start, to take the database away mid-stream."""

    def __init__(self, admin_url: str, local: Any = None) -> None:
        self.admin_url = admin_url
        self._local = local

    async def create_database(self) -> str:
        name = f"pw_{uuid.uuid4().hex[:12]}"
        con = await asyncpg.connect(self.admin_url)
        try:
            await con.execute(f'CREATE DATABASE "{name}"')
        finally:
            await con.close()
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{name}"

    @property
    def can_restart(self) -> bool:
        return self._local is not None

    def stop(self, mode: str = "fast") -> None:
        self._owned().stop(mode)

    def start(self) -> None:
        self._owned().start()

    def ensure_running(self) -> None:
        if self._local is not None and not self._local.running:
            self._local.start()

    def _owned(self) -> Any:
        if self._local is None:
            raise RuntimeError("this PostgreSQL server is not ours to stop; check can_restart")
        return self._local


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    external = os.environ.get(ENV_URL, "").strip()
    if external:
        yield PostgresServer(external)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15", driver=None)
        container.start()
        try:
            yield PostgresServer(container.get_connection_url())
        finally:
            container.stop()
        return
    server = load_postgres_local().LocalPostgres()
    server.start()
    try:
        yield PostgresServer(server.url, server)
    finally:
        server.close()


@pytest.fixture
async def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    pg_server.ensure_running()
    return await pg_server.create_database()


class OutboxGate:
    """Holds every writer of the database at its first outbox insert (after it has taken
    its seqs and its row locks, before its commit) until :meth:`open`: a trigger on
    ``changes`` that waits for an advisory lock the gate holds. A writer's transaction
    runs in the server, with no pause in this process to hook into, so the hold is
    made there.

        async with OutboxGate(url) as gate:
            ...                  # writers that reach the outbox wait
            await gate.open()    # they go on
    """

    KEY = 0x6761746500  # "gate"

    def __init__(self, url: str) -> None:
        self.url = url
        self._con: asyncpg.Connection | None = None
        self._held = False

    async def __aenter__(self) -> OutboxGate:
        self._con = await asyncpg.connect(self.url)
        await self._con.execute(
            "CREATE FUNCTION test_outbox_gate() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN PERFORM pg_advisory_xact_lock_shared({self.KEY}); RETURN NEW; END $$;"
            " CREATE TRIGGER test_outbox_gate BEFORE INSERT ON changes"
            " FOR EACH ROW EXECUTE FUNCTION test_outbox_gate()"
        )
        await self._con.execute("SELECT pg_advisory_lock($1)", self.KEY)
        self._held = True
        return self

    async def open(self) -> None:
        assert self._con is not None
        if self._held:
            await self._con.execute("SELECT pg_advisory_unlock($1)", self.KEY)
            self._held = False

    async def __aexit__(self, *exc: object) -> None:
        assert self._con is not None
        try:
            await self.open()
            await self._con.execute(
                "DROP TRIGGER test_outbox_gate ON changes; DROP FUNCTION test_outbox_gate()"
            )
        finally:
            await self._con.close()


async def lock_waits(url: str) -> list[str]:
    """What each session of the database that waits on a lock waits for (its
    ``wait_event``: "advisory" at an :class:`OutboxGate`, "transactionid" behind another
    writer's row lock ...), sorted."""
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch(
            "SELECT wait_event FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
    finally:
        await con.close()
    return sorted(row[0] for row in rows)
