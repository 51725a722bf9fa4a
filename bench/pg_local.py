"""PostgreSQL for the benchmarks: a local server from the machine's binaries, or an
existing one, and a fresh database per run.

``deploy/postgres_local.py`` is loaded by path (``deploy/`` is scripts, not a package),
as ``tests/pg_fixtures.py`` does. The server keeps ``fsync=on`` and the default
``synchronous_commit=on``: a 2xx (or a Kafka offset commit) follows a durable commit, as
with SQLite's ``synchronous=FULL``.

    with bench_postgres(None) as pg:      # None: start a local server; or an admin URL
        url = pg.fresh("webhook")         # postgresql://.../pwb_webhook_<hex>
        pg.counts(url)                    # {"events": ..., "tasks": ..., "changes": ...}
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_LOCAL_PATH = REPO / "deploy" / "postgres_local.py"

__all__ = ["BenchPostgres", "bench_postgres", "load_postgres_local"]


def load_postgres_local() -> ModuleType:
    name = "phasewatch_deploy_postgres_local"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _LOCAL_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def _admin(url: str, *statements: str) -> None:
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        for sql in statements:
            await con.execute(sql)
    finally:
        await con.close()


async def _counts(url: str) -> dict[str, int]:
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        exists = await con.fetchval("SELECT to_regclass('counters') IS NOT NULL")
        out: dict[str, int] = {}
        if exists:
            row = await con.fetchrow("SELECT * FROM counters")  # columns vary by schema
            out.update({f"counter_{k}": int(v) for k, v in row.items() if isinstance(v, int)})
            for table in ("events", "tasks", "changes"):
                out[table] = int(await con.fetchval(f"SELECT count(*) FROM {table}"))
        return out
    finally:
        await con.close()


class BenchPostgres:
    """A server (ours or given) that hands out fresh databases and drops them again."""

    def __init__(self, admin_url: str, local: Any = None) -> None:
        self.admin_url = admin_url
        self.local = local
        self.created: list[str] = []

    def fresh(self, tag: str) -> str:
        name = f"pwb_{tag.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        asyncio.run(_admin(self.admin_url, f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{name}"

    def configure(self, url: str, settings: list[str]) -> None:
        """``ALTER DATABASE ... SET name = value`` for each ``name=value``: sessions opened
        afterwards get them (server tuning to try, with no change to phasewatch)."""
        name = url.rpartition("/")[2]
        statements = []
        for item in settings:
            key, sep, value = item.partition("=")
            if not sep or not key.replace(".", "").replace("_", "").isalnum():
                raise ValueError(f"--pg-set: expected NAME=VALUE, got {item!r}")
            statements.append(f"ALTER DATABASE \"{name}\" SET {key} = '{value}'")
        if statements:
            self.admin(*statements)

    def drop(self, url: str) -> None:
        name = url.rpartition("/")[2]
        with contextlib.suppress(Exception):
            asyncio.run(_admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            self.created.remove(name)

    def admin(self, *statements: str) -> None:
        asyncio.run(_admin(self.admin_url, *statements))

    def counts(self, url: str) -> dict[str, int]:
        return asyncio.run(_counts(url))

    def server_version(self) -> str:
        async def q() -> str:
            import asyncpg

            con = await asyncpg.connect(self.admin_url)
            try:
                settings = await con.fetch(
                    "SELECT name, setting FROM pg_settings WHERE name IN"
                    " ('fsync', 'synchronous_commit', 'shared_buffers', 'wal_level')"
                )
                version = await con.fetchval("SHOW server_version")
                return f"PostgreSQL {version} " + " ".join(f"{k}={v}" for k, v in settings)
            finally:
                await con.close()

        return asyncio.run(q())


@contextlib.contextmanager
def bench_postgres(admin_url: str | None) -> Iterator[BenchPostgres]:
    """``admin_url`` None: start a local server for the duration (deleted after);
    otherwise use that server (its user must be allowed to create databases)."""
    if admin_url:
        pg = BenchPostgres(admin_url)
        try:
            yield pg
        finally:
            for name in list(pg.created):
                pg.drop(f"{admin_url.rpartition('/')[0]}/{name}")
        return
    server = load_postgres_local().LocalPostgres()
    server.start()
    try:
        yield BenchPostgres(server.url, server)
    finally:
        server.close()


def code_state() -> str:
    """The commit measured, and the service files that differ from it (other work in
    the same tree shows up in the numbers)."""
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    dirty = git("status", "--short", "--", "consumer", "handlers").splitlines()
    head = git("log", "--oneline", "-1")[:72]
    return f"{head}" + (
        f" + uncommitted: {', '.join(d.split(maxsplit=1)[-1] for d in dirty)}" if dirty else ""
    )
