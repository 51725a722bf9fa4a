"""SQLite with ingestion in a child process: the same store, both cores.

CPython runs one thread of Python at a time. With the embedded store, the event loop
(HTTP, signatures, decoding) and the SQLite writer (fold, encoding, SQL) share that one
interpreter lock, so a 2-core machine works like a 1-core one. Here :meth:`ingest` runs
in a child process that owns a writer connection to the same database file: it decodes
the raw events again (cheap, and it keeps the wire format the only interface), folds
them and commits, in parallel with the parent's event loop. Everything else (reads,
delivery records, leases) stays in the parent on the ordinary :class:`SQLiteStore`;
SQLite's file lock arbitrates the two writers (``BEGIN IMMEDIATE``, busy timeout). If
the child dies, the batch in flight fails (the caller answers 503) and a new child is
started.

Semantics are the store's own: the child runs the same ``_ingest_in_tx``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from consumer.codec import Event, decode
from consumer.sqlite_store import SQLiteStore, Synchronous
from consumer.store import ChangeRecord, IngestResult, Outcome

__all__ = ["SQLiteProcessStore"]


def _child(conn: Connection, path: str, synchronous: Synchronous, record_updates: bool) -> None:
    store = SQLiteStore(path, synchronous=synchronous, record_updates=record_updates)
    con = store._connect(True)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            break
        if request is None:
            break
        raws, source, received_at, record_changes = request
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                events = [decode(raw) for raw in raws]
                result = store._ingest_in_tx(con, events, source, received_at, record_changes)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            conn.send(
                (
                    "ok",
                    [o.value for o in result.outcomes],
                    [_change_tuple(c) for c in result.changes],
                )
            )
        except Exception as exc:  # reported to the parent, which raises it to the caller
            conn.send(("error", f"{type(exc).__name__}: {exc}", None))
    con.close()


def _change_tuple(c: ChangeRecord) -> tuple[Any, ...]:
    return (
        c.seq,
        c.task_id,
        c.event_id,
        c.previous_phase,
        c.phase,
        c.changed_at,
        c.recorded_at,
        c.task,
        c.kind,
    )


class SQLiteProcessStore(SQLiteStore):
    """:class:`SQLiteStore` whose ``ingest`` runs in a child process."""

    def __init__(
        self, path: Path | str, *, synchronous: Synchronous = "FULL", record_updates: bool = False
    ) -> None:
        super().__init__(path, synchronous=synchronous, record_updates=record_updates)
        self._proc: Any = None
        self._conn: Connection | None = None
        self._ipc = ThreadPoolExecutor(1, thread_name_prefix="phasewatch-sqlite-ipc")

    async def open(self) -> None:
        await super().open()  # creates the schema before the child connects
        self._spawn()

    def _spawn(self) -> None:
        # spawn, not fork: the parent has threads and an event loop running.
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child,
            args=(child, str(self.path), self._synchronous, self.record_updates),
            name="phasewatch-sqlite-writer",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._conn = parent

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._ipc, conn.send, None)
            await asyncio.get_running_loop().run_in_executor(self._ipc, self._proc.join, 10)
            conn.close()
        self._ipc.shutdown(wait=True)
        await super().close()

    async def ingest(
        self,
        events: Sequence[Event],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
    ) -> IngestResult:
        conn = self._conn
        if conn is None:
            raise RuntimeError("SQLiteProcessStore is not open")
        request = ([e.raw for e in events], source, received_at, record_changes)

        def round_trip() -> Any:
            conn.send(request)
            return conn.recv()

        try:
            status, outcomes, changes = await asyncio.get_running_loop().run_in_executor(
                self._ipc, round_trip
            )
        except (EOFError, OSError):
            # The writer died (killed, out of memory). Start another; this batch fails
            # (503: the sender retries, and a batch it did commit comes back a duplicate).
            conn.close()
            self._spawn()
            raise RuntimeError("SQLite writer process died; a new one was started") from None
        if status != "ok":
            raise RuntimeError(f"SQLite writer process failed: {outcomes}")
        return IngestResult([Outcome(o) for o in outcomes], [ChangeRecord(*c) for c in changes])
