"""SQLite :class:`~consumer.store.base.Store`: the embedded default. With
:mod:`~consumer.store.sqlite.rows` and :mod:`~consumer.store.sqlite.schema`, the only
code that speaks SQLite.

One file, WAL journal. Writes run on one dedicated thread with its own connection, so
the event loop never blocks on disk and batches commit one after another; reads run on a
second thread and connection, which WAL lets proceed while a write is in progress.

Durability: ``synchronous=FULL`` by default, so a batch acknowledged to a webhook sender
survives power loss, not just a process crash. ``NORMAL`` trades the last few batches on
power loss (never on a process crash) for fewer fsyncs.

Several processes may open the same file (``phasewatch serve`` and a CLI ``import``):
each write transaction starts with ``BEGIN IMMEDIATE`` and reads what it folds against
inside the transaction.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from consumer.core.change import ChangeRecord, stale_kind
from consumer.core.codec import Event, EventFormat, decode
from consumer.core.fold import TaskState
from consumer.core.plan import decode_keys, dedup_key, plan_batch
from consumer.core.receipt import Receipt
from consumer.store.base import (
    REPLAYED_SOURCES,
    Cursor,
    Delivery,
    DeliveryStatus,
    HistoryEntry,
    IngestResult,
    RawIngestResult,
    StoredTask,
    StoreOpenError,
    StoreStats,
    TaskPage,
    TaskQuery,
    ingest_decoded,
)
from consumer.store.migrations import Migration, pending, too_new
from consumer.store.sqlite.migrations import MIGRATIONS, statements
from consumer.store.sqlite.rows import (
    known_events,
    plan_rows,
    read_current,
    select_in,
    task_row,
    write_rows,
)
from consumer.store.sqlite.schema import CHUNK, begin_immediate, rollback

__all__ = ["SQLiteStore", "Synchronous", "path_from_url"]

T = TypeVar("T")
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

_log = logging.getLogger(__name__)


def _open_failure(path: Path, exc: sqlite3.DatabaseError) -> str:
    """One line naming the file and what is wrong with it."""
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"{path}: not a SQLite database (or a corrupt one): {text}"
    if "readonly" in text or "read-only" in text:
        return f"{path}: the file (or its directory) is read-only: {text}"
    if "unable to open" in text:
        return f"{path}: cannot be opened (missing directory or no permission): {text}"
    return f"{path}: {text}"


def _schema_version(con: sqlite3.Connection) -> int:
    """The database's schema version: ``user_version``, except that version 0 with the
    history table is 1 (written before the schema carried a version)."""
    (version,) = con.execute("PRAGMA user_version").fetchone()
    if (
        version == 0
        and con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        ).fetchone()
    ):
        return 1
    return int(version)


def path_from_url(url: str) -> Path:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db`` to a path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"not a SQLite URL (expected sqlite:///PATH): {url!r}")
    return Path(url[len(prefix) :])


class SQLiteStore:
    """``migrate``: apply pending schema migrations at open (False: refuse to open a
    database that needs them, naming ``phasewatch migrate``). ``migrations_applied``:
    the steps this store's opening applied (empty when the file was up to date)."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: Synchronous = "FULL",
        record_updates: bool = False,
        migrate: bool = True,
    ) -> None:
        self.path = Path(path)
        self.record_updates = record_updates
        self.migrate = migrate
        self.migrations_applied: list[Migration] = []
        self._synchronous = synchronous
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="phasewatch-sqlite-w")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="phasewatch-sqlite-r")
        self._wcon: sqlite3.Connection | None = None
        self._rcon: sqlite3.Connection | None = None

    @property
    def pipeline_depth(self) -> int:
        return 1  # writes run on this process's writer thread, one batch at a time

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self.migrations_applied = []
        self._wcon = await self._run(self._writer, self._connect, True)
        self._rcon = await self._run(self._reader, self._connect, False)

    async def close(self) -> None:
        for pool, con in ((self._writer, self._wcon), (self._reader, self._rcon)):
            if con is not None:
                await self._run(pool, con.close)
        self._wcon = self._rcon = None
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    def writer_connection(self) -> sqlite3.Connection:
        """A new writer connection (schema ensured), for a writer of this store's own in
        another process (:mod:`consumer.store.sqlite.process`)."""
        return self._connect(True)

    def _connect(self, writer: bool) -> sqlite3.Connection:
        try:
            return self._open_connection(writer)
        except sqlite3.DatabaseError as exc:
            raise StoreOpenError(_open_failure(self.path, exc)) from exc
        except OSError as exc:
            raise StoreOpenError(f"{self.path}: cannot be opened: {exc.strerror}") from exc

    def _open_connection(self, writer: bool) -> sqlite3.Connection:
        if writer:
            if self.path.is_file() and self.path.stat().st_size == 0:
                # SQLite would take it for a new database and start an empty store: a
                # history lost without a word (a truncated copy, a failed restore).
                raise StoreOpenError(
                    f"{self.path}: the file is empty (0 bytes), not a phasewatch database;"
                    " move it away to start a new store there"
                )
            if not self.migrate and not self.path.exists():
                # Not even an empty file: `phasewatch migrate` is what creates the store.
                raise StoreOpenError(
                    f"{self.path} does not exist (schema 0, this version needs"
                    f" {len(MIGRATIONS)}) and migrations are off: run `phasewatch migrate`"
                    " to create it"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            con.execute("PRAGMA busy_timeout = 10000")
            if writer:
                # Two processes opening one file at once (a migration Job next to a
                # replica, tests): switching to WAL and the first reads can meet the
                # other's lock in ways SQLite reports at once rather than through the
                # busy handler. Those are retried, up to the same 10 s.
                _when_unlocked(lambda: con.execute("PRAGMA journal_mode = WAL"))
                _when_unlocked(lambda: self._ensure_schema(con))
                # From here on the writer waits in begin_immediate, finer grained.
                con.execute("PRAGMA busy_timeout = 0")
            con.execute(f"PRAGMA synchronous = {self._synchronous}")
        except BaseException:
            con.close()
            raise
        return con

    def _ensure_schema(self, con: sqlite3.Connection) -> None:
        """Bring the database to the latest schema: each pending step of
        :data:`~consumer.store.sqlite.migrations.MIGRATIONS` in its own write transaction,
        with its ``user_version``. The version is read again under the write lock, so
        that of two processes opening the file at once, the second finds the step done."""
        version = _schema_version(con)
        self._check_version(version)
        if pending(MIGRATIONS, version) and not self.migrate:
            raise StoreOpenError(
                f"{self.path} holds phasewatch schema {version}, this version needs"
                f" {len(MIGRATIONS)} and migrations are off: run `phasewatch migrate`"
                " to apply them"
            )
        while steps := pending(MIGRATIONS, version):
            step = steps[0]
            started = time.monotonic()
            begin_immediate(con)
            try:
                version = _schema_version(con)
                self._check_version(version)
                ran = version == step.version - 1
                if ran:
                    for statement in statements(step.sql):
                        con.execute(statement)
                    con.execute(f"PRAGMA user_version = {step.version}")
                    version = step.version
                con.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                rollback(con)
                raise StoreOpenError(
                    f"{_open_failure(self.path, exc)} (applying schema migration"
                    f" {step.version}, {step.name!r}: rolled back, the database stays at"
                    f" schema {version})"
                ) from exc
            except BaseException:
                rollback(con)
                raise
            if ran:
                self.migrations_applied.append(step)
                _log.info(
                    "%s: applied schema migration %d (%s) in %.2f s",
                    self.path,
                    step.version,
                    step.name,
                    time.monotonic() - started,
                )

    def _check_version(self, version: int) -> None:
        if (refusal := too_new(str(self.path), version, MIGRATIONS)) is not None:
            raise StoreOpenError(refusal)

    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _w(self) -> sqlite3.Connection:
        if self._wcon is None:
            raise RuntimeError("SQLiteStore is not open")
        return self._wcon

    def _r(self) -> sqlite3.Connection:
        if self._rcon is None:
            raise RuntimeError("SQLiteStore is not open")
        return self._rcon

    # ------------------------------------------------------------ writes

    async def ingest(
        self,
        events: Sequence[Event],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
    ) -> IngestResult:
        batch = list(events)
        return await self._write(
            lambda con: self.ingest_in_tx(con, batch, source, received_at, record_changes)
        )

    async def ingest_raw(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
        keys: Sequence[bytes | None] | None = None,  # one writer, on this loop: unused
        receipts: Sequence[Receipt | None] | None = None,
    ) -> RawIngestResult:
        del keys
        return await ingest_decoded(
            self, raws, source, received_at, record_changes=record_changes, receipts=receipts
        )

    def ingest_in_tx(
        self,
        con: sqlite3.Connection,
        events: list[Event],
        source: str,
        received_at: int,
        record_changes: bool = True,
    ) -> IngestResult:
        current = read_current(con, {e.task_id for e in events if e.task_id is not None})
        states = {
            task_id: TaskState(orjson.loads(c.doc), decode_keys(c.keys))
            for task_id, c in current.items()
            if c.doc is not None and c.keys is not None  # else the view lost the row
        }
        numbers = {task_id: c.no for task_id, c in current.items()}
        plan = plan_batch(
            events,
            known_events(con, [dedup_key(e) for e in events], numbers),
            states,
            record_updates=self.record_updates,
            record_changes=record_changes,
        )
        rows = plan_rows(plan)
        base = write_rows(con, rows, current, source, received_at)
        recorded = [c.recorded(seq, received_at) for seq, c in enumerate(plan.changes, base + 1)]
        return IngestResult(plan.outcomes, recorded)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction on the writer thread."""

        def run() -> T:
            con = self._w()
            begin_immediate(con)
            try:
                result = fn(con)
                con.execute("COMMIT")
            except BaseException:
                rollback(con)
                raise
            return result

        return await self._run(self._writer, run)

    async def set_cursor(self, handler: str, seq: int) -> None:
        await self._write(
            lambda con: con.execute(
                "INSERT INTO cursors (handler, seq) VALUES (?, ?)"
                " ON CONFLICT (handler) DO UPDATE SET seq = excluded.seq",
                (handler, seq),
            )
        )

    async def set_cursors(self, cursors: Mapping[str, int]) -> None:
        if not cursors:
            return
        rows = list(cursors.items())
        await self._write(
            lambda con: con.executemany(
                "INSERT INTO cursors (handler, seq) VALUES (?, ?)"
                " ON CONFLICT (handler) DO UPDATE SET seq = excluded.seq",
                rows,
            )
        )

    async def record_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        rows = [
            (
                d.handler,
                d.seq,
                int(d.replay),
                d.status.value,
                d.attempts,
                d.first_attempt_at,
                d.last_attempt_at,
                d.error,
            )
            for d in deliveries
        ]
        await self._write(
            lambda con: con.executemany(
                "INSERT OR REPLACE INTO deliveries (handler, seq, replay, status, attempts,"
                " first_attempt_at, last_attempt_at, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        )

    async def set_delivery_status(
        self,
        frm: DeliveryStatus,
        to: DeliveryStatus,
        *,
        handler: str | None = None,
        seqs: Sequence[int] | None = None,
    ) -> int:
        where = ["status = ?"]
        params: list[Any] = [frm.value]
        if handler is not None:
            where.append("handler = ?")
            params.append(handler)
        if seqs is not None:
            where.append(f"seq IN ({','.join('?' * len(seqs))})")
            params.extend(seqs)
        sql = f"UPDATE deliveries SET status = ? WHERE {' AND '.join(where)}"  # noqa: S608
        cursor = await self._write(lambda con: con.execute(sql, [to.value, *params]))
        return int(cursor.rowcount)

    async def acquire_lease(
        self, name: str, owner: str, ttl_ms: int, now_ms: int, *, take_from: str | None = None
    ) -> str:
        return await self._write(
            lambda con: _take_lease(con, name, owner, ttl_ms, now_ms, take_from=take_from)
        )

    async def acquire_leases(
        self, names: Sequence[str], owner: str, ttl_ms: int, now_ms: int
    ) -> list[str]:
        if not names:
            return []
        return await self._write(
            lambda con: [_take_lease(con, n, owner, ttl_ms, now_ms, take_from=None) for n in names]
        )

    async def release_lease(self, name: str, owner: str) -> None:
        await self._write(
            lambda con: con.execute(
                "DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner)
            )
        )

    async def listen_changes(self, wake: Callable[[], None]) -> None:
        del wake  # one process writes here: its commits wake the dispatcher directly

    async def lease_holders(self, prefix: str, now_ms: int) -> dict[str, str]:
        # substr, not LIKE: a name may hold '%' or '_'.
        rows = await self._read(
            "SELECT name, owner FROM leases WHERE substr(name, 1, ?) = ? AND expires_at >= ?",
            (len(prefix), prefix, now_ms),
        )
        return {str(name): str(owner) for name, owner in rows}

    # ------------------------------------------------------------ reads

    async def _read(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
        def run() -> list[Any]:
            return self._r().execute(sql, params).fetchall()

        return await self._run(self._reader, run)

    async def get_task(self, task_id: str) -> StoredTask | None:
        sql = f"SELECT doc, version FROM tasks WHERE no = {_NO}"  # noqa: S608 - constants only
        rows = await self._read(sql, (task_id,))
        return StoredTask(orjson.loads(rows[0][0]), rows[0][1]) if rows else None

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        where: list[str] = []
        params: list[Any] = []
        if query.phases:
            where.append(f"phase IN ({','.join('?' * len(query.phases))})")
            params.extend(query.phases)
        if query.types:
            where.append(f"type IN ({','.join('?' * len(query.types))})")
            params.extend(query.types)
        if query.updated_since is not None:
            where.append("updated_at >= ?")
            params.append(query.updated_since)
        if query.after is not None:
            where.append(f"(updated_at, id) {'<' if query.descending else '>'} (?, ?)")
            params.extend((query.after.updated_at, query.after.task_id))
        order = "DESC" if query.descending else "ASC"
        # Only fixed fragments and '?' placeholders are interpolated; values are bound.
        sql = (
            "SELECT doc, version, updated_at, id FROM tasks"  # noqa: S608
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY updated_at {order}, id {order} LIMIT ?"
        )
        rows = await self._read(sql, [*params, query.limit + 1])
        page = rows[: query.limit]
        tasks = [StoredTask(orjson.loads(doc), version) for doc, version, _, _ in page]
        more = len(rows) > query.limit
        cursor = Cursor(page[-1][2], page[-1][3]) if more and page else None
        return TaskPage(tasks, cursor)

    async def task_history(self, task_id: str) -> list[HistoryEntry]:
        return await self.history_after(0, 1_000_000, task_id=task_id)

    async def history_after(
        self, seq: int, limit: int = 1000, *, task_id: str | None = None
    ) -> list[HistoryEntry]:
        where, params = (
            ("seq > ?", [seq])
            if task_id is None
            else (f"task_no = {_NO} AND seq > ?", [task_id, seq])
        )
        sql = f"{_EVENT_COLUMNS} WHERE {where} ORDER BY seq LIMIT ?"
        rows = await self._read(sql, [*params, limit])
        return [_entry(row) for row in rows]

    async def task_ids_after(self, after: str | None, limit: int = 500) -> list[str]:
        rows = await self._read(
            "SELECT id FROM task_numbers WHERE id > ? ORDER BY id LIMIT ?",
            (after or "", limit),
        )
        return [row[0] for row in rows]

    async def history_of_tasks(self, task_ids: Sequence[str], upto_seq: int) -> list[HistoryEntry]:
        def run() -> list[Any]:
            sql = (
                f"{_EVENT_COLUMNS}"  # noqa: S608 - constants and '?' placeholders only
                " WHERE task_no IN (SELECT no FROM task_numbers WHERE id IN ({}))"
                " AND seq <= ?"
            )
            out: list[Any] = []
            for start in range(0, len(task_ids), CHUNK):
                chunk = list(task_ids[start : start + CHUNK])
                marks = ",".join("?" * len(chunk))
                out.extend(self._r().execute(sql.format(marks), [*chunk, upto_seq]).fetchall())
            return out

        rows = await self._run(self._reader, run)
        entries = [_entry(row) for row in rows]
        entries.sort(key=lambda e: (e.task_id or "", e.seq))
        return entries

    async def stage_rebuilt(self, states: Mapping[str, TaskState]) -> None:
        rows = [task_row(task_id, s) for task_id, s in states.items()]
        await self._write(
            lambda con: con.executemany(
                _STAGE_REBUILT,
                rows,
            )
        )

    async def swap_rebuilt(self, upto_seq: int) -> int:
        def run(con: sqlite3.Connection) -> int:
            # Events that arrived while the rebuild ran were folded into the live view, not
            # into the staged one: fold them in now, under the write lock, then swap.
            late = [
                decode(bytes(raw))
                for (raw,) in con.execute(
                    "SELECT raw FROM events WHERE seq > ? AND task_no IS NOT NULL ORDER BY seq",
                    (upto_seq,),
                )
            ]
            touched = list({e.task_id for e in late if e.task_id is not None})
            staged = {
                task_id: TaskState(orjson.loads(doc), decode_keys(keys))
                for task_id, doc, keys in select_in(
                    con, "SELECT id, doc, keys FROM tasks_rebuild WHERE id IN ({})", touched
                )
            }
            plan = plan_batch(late, (), staged)
            con.executemany(
                _STAGE_REBUILT,
                [task_row(task_id, s) for task_id, s in plan.states.items()],
            )
            con.execute("DELETE FROM tasks WHERE no NOT IN (SELECT no FROM tasks_rebuild)")
            con.execute(
                "INSERT INTO tasks (no, id, type, phase, updated_at, version, doc, keys)"
                " SELECT no, id, type, phase, updated_at, 0, doc, keys FROM tasks_rebuild"
                " WHERE true ON CONFLICT (no) DO UPDATE SET type = excluded.type,"
                " phase = excluded.phase,"
                " updated_at = excluded.updated_at,"
                " version = tasks.version + (tasks.doc IS NOT excluded.doc),"
                " doc = excluded.doc, keys = excluded.keys"
            )
            con.execute("DELETE FROM tasks_rebuild")
            (count,) = con.execute("SELECT count(*) FROM tasks").fetchone()
            return int(count)

        return await self._write(run)

    async def discard_rebuilt(self) -> None:
        await self._write(lambda con: con.execute("DELETE FROM tasks_rebuild"))

    async def get_meta(self, key: str) -> str | None:
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            await self._write(lambda con: con.execute("DELETE FROM meta WHERE key = ?", (key,)))
        else:
            await self._write(
                lambda con: con.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            )

    async def task_changes(self, task_id: str) -> list[ChangeRecord]:
        rows = await self._read(
            f"{_CHANGE_COLUMNS} WHERE task_no = {_NO} ORDER BY seq",
            (task_id,),
        )
        return [_change(row) for row in rows]

    async def changes_after(self, seq: int, limit: int = 500) -> list[ChangeRecord]:
        rows = await self._read(
            f"{_CHANGE_COLUMNS} WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        )
        return [_change(row) for row in rows]

    async def changes_by_seq(self, seqs: Sequence[int]) -> list[ChangeRecord]:
        def run() -> list[Any]:
            return select_in(self._r(), f"{_CHANGE_COLUMNS} WHERE seq IN ({{}})", list(seqs))

        rows = await self._run(self._reader, run)
        return sorted((_change(row) for row in rows), key=lambda c: c.seq)

    async def oldest_change_seq(self) -> int:
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (_PRUNED_UPTO,))
        return (int(rows[0][0]) if rows else 0) + 1

    async def prune_changes(
        self,
        *,
        before_ms: int | None = None,
        keep_last: int | None = None,
        needed_by: Sequence[str] | None = None,
    ) -> int:
        if before_ms is None and keep_last is None:
            return 0

        def run(con: sqlite3.Connection) -> int:
            (last,) = con.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
            floor = _needed_floor(con, needed_by, last)
            upto = floor if keep_last is None else min(floor, last - keep_last)
            where = ["seq <= ?"]
            params: list[Any] = [upto]
            if before_ms is not None:
                where.append("recorded_at < ?")
                params.append(before_ms)
            where.append(
                "seq NOT IN (SELECT seq FROM deliveries"
                " WHERE status IN ('failing', 'dead', 'redrive'))"
            )
            sql = f"DELETE FROM changes WHERE {' AND '.join(where)} RETURNING seq"  # noqa: S608
            gone = [seq for (seq,) in con.execute(sql, params).fetchall()]
            if gone:
                con.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
                    " SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                    (_PRUNED_UPTO, str(max(gone))),
                )
            return len(gone)

        return await self._write(run)

    async def get_cursor(self, handler: str) -> int | None:
        rows = await self._read("SELECT seq FROM cursors WHERE handler = ?", (handler,))
        return int(rows[0][0]) if rows else None

    async def deliveries_for(
        self, handler: str, seqs: Sequence[int], *, replay: bool = False
    ) -> dict[int, Delivery]:
        def run() -> list[Any]:
            sql = f"{_DELIVERY_COLUMNS} WHERE handler = ? AND replay = ? AND seq IN ({{}})"
            out: list[Any] = []
            values = list(seqs)
            for start in range(0, len(values), CHUNK):
                chunk = values[start : start + CHUNK]
                marks = ",".join("?" * len(chunk))
                out.extend(
                    self._r().execute(sql.format(marks), [handler, int(replay), *chunk]).fetchall()
                )
            return out

        rows = await self._run(self._reader, run)
        return {d.seq: d for d in map(_delivery, rows)}

    async def list_deliveries(
        self, statuses: Sequence[DeliveryStatus], handler: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        where = f"status IN ({','.join('?' * len(statuses))})"
        params: list[Any] = [s.value for s in statuses]
        if handler is not None:
            where += " AND handler = ?"
            params.append(handler)
        sql = f"{_DELIVERY_COLUMNS} WHERE {where} ORDER BY seq, handler LIMIT ?"
        rows = await self._read(sql, [*params, limit])
        return [_delivery(row) for row in rows]

    async def record_stale(
        self, phase: str, stale_for_ms: int, now_ms: int, limit: int = 500
    ) -> list[ChangeRecord]:
        kind = stale_kind(stale_for_ms)
        params: dict[str, Any] = {
            "phase": phase,
            "cutoff": now_ms - stale_for_ms,
            "ms": stale_for_ms,
            "limit": limit,
            "replayed": orjson.dumps(REPLAYED_SOURCES).decode(),
        }

        def run(con: sqlite3.Connection) -> list[ChangeRecord]:
            # Under the write lock: no ingest can move these tasks on meanwhile.
            due = con.execute(_STALE_DUE, params).fetchall()
            if not due:
                return []
            row = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
            base: int = row[0] if row else 0
            records: list[ChangeRecord] = []
            changes: list[tuple[Any, ...]] = []
            alerts: list[tuple[Any, ...]] = []
            for seq, (no, task_id, updated_at, doc, keys) in enumerate(due, base + 1):
                event_id = decode_keys(keys)["status"][2]
                changes.append(
                    (seq, no, task_id, event_id, phase, phase, updated_at, now_ms, doc, kind)
                )
                alerts.append((no, phase, updated_at, stale_for_ms, seq))
                records.append(
                    ChangeRecord(
                        seq,
                        task_id,
                        event_id,
                        phase,
                        phase,
                        updated_at,
                        now_ms,
                        orjson.loads(doc),
                        kind,
                    )
                )
            con.executemany(
                "INSERT INTO changes (seq, task_no, task_id, event_id, previous_phase, phase,"
                " changed_at, recorded_at, task, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                changes,
            )
            # The task's earlier waits in this phase can never match again (its
            # updatedAt only grows): one row per (task, phase, threshold) is kept.
            con.executemany(
                "DELETE FROM stale_alerts WHERE task_no = ? AND phase = ? AND updated_at < ?"
                " AND stale_for_ms = ?",
                [a[:4] for a in alerts],
            )
            con.executemany(
                "INSERT INTO stale_alerts (task_no, phase, updated_at, stale_for_ms, seq)"
                " VALUES (?, ?, ?, ?, ?)",
                alerts,
            )
            return records

        # A look first, on the reader: most sweeps find nothing due, and need not take
        # the write lock (ingestion waits on it) to say so. Anything committed after the
        # look is found by the next sweep.
        if not await self._read(_STALE_DUE, {**params, "limit": 1}):
            return []
        return await self._write(run)

    async def count_stale(self, phase: str, stale_for_ms: int, now_ms: int) -> int:
        rows = await self._read(
            "SELECT count(*) FROM tasks WHERE phase = ? AND updated_at <= ?",
            (phase, now_ms - stale_for_ms),
        )
        return int(rows[0][0])

    async def stats(self) -> StoreStats:
        rows = await self._read(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM tasks),"
            " (SELECT count(*) FROM changes),"
            # Not max(seq): retention may have pruned the newest changes.
            " (SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'changes'),"
            " (SELECT coalesce(max(seq), 0) FROM events)"
        )
        events, tasks, changes, last, last_event = rows[0]
        return StoreStats(events, tasks, changes, last, last_event)


_PRUNED_UPTO = "phasewatch:changes_pruned_upto"


def _take_lease(
    con: sqlite3.Connection,
    name: str,
    owner: str,
    ttl_ms: int,
    now_ms: int,
    *,
    take_from: str | None,
) -> str:
    con.execute(
        "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
        " expires_at = excluded.expires_at"
        " WHERE leases.owner IN (excluded.owner, ?) OR leases.expires_at < ?",
        (name, owner, now_ms + ttl_ms, take_from, now_ms),
    )
    (holder,) = con.execute("SELECT owner FROM leases WHERE name = ?", (name,)).fetchone()
    return str(holder)


def _when_unlocked(fn: Callable[[], object], wait_s: float = 10.0) -> None:
    """Run ``fn``, again while SQLite answers "database is locked" (up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    delay = 0.001
    while True:
        try:
            fn()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _needed_floor(con: sqlite3.Connection, needed_by: Sequence[str] | None, last: int) -> int:
    """The highest seq every named handler has resolved (``last`` when none is named)."""
    cursors = con.execute("SELECT handler, seq FROM cursors").fetchall()
    seqs = [
        seq
        for name, seq in cursors
        if needed_by is None or any(name == h or name.startswith(f"{h}@") for h in needed_by)
    ]
    return min(seqs, default=last)


# A staged task keeps the number its history is filed under.
_STAGE_REBUILT = (
    "INSERT OR REPLACE INTO tasks_rebuild (no, id, type, phase, updated_at, doc, keys)"
    " VALUES ((SELECT no FROM task_numbers WHERE id = ?1), ?1, ?2, ?3, ?4, ?5, ?6)"
)
_NO = "(SELECT no FROM task_numbers WHERE id = ?)"

_CHANGE_COLUMNS = (
    "SELECT seq, task_id, event_id, previous_phase, phase, changed_at, recorded_at, task, kind,"
    " traceparent FROM changes"
)
_EVENT_COLUMNS = (
    "SELECT seq, event_id, kind, format, source, received_at, created_at, task_id, raw,"
    " receipt FROM events"
)


_DELIVERY_COLUMNS = (
    "SELECT handler, seq, status, attempts, first_attempt_at, last_attempt_at, error, replay"
    " FROM deliveries"
)

# The tasks due a stale alert (see StaleStore.record_stale), oldest first: in the phase
# since the cutoff or before (tasks_by_phase), not alerted for this updatedAt and
# threshold, and watched: the task's last recorded phase change led here, or a live
# event carried the current updatedAt.
_STALE_DUE = (
    "SELECT t.no, t.id, t.updated_at, t.doc, t.keys FROM tasks AS t"
    " WHERE t.phase = :phase AND t.updated_at <= :cutoff"
    " AND NOT EXISTS (SELECT 1 FROM stale_alerts AS a WHERE a.task_no = t.no"
    " AND a.phase = :phase AND a.updated_at = t.updated_at AND a.stale_for_ms = :ms)"
    " AND ((SELECT c.phase FROM changes AS c WHERE c.task_no = t.no AND c.kind = 'phase'"
    " ORDER BY c.seq DESC LIMIT 1) = :phase"
    " OR EXISTS (SELECT 1 FROM events AS e WHERE e.task_no = t.no"
    " AND e.updated_at = t.updated_at"
    " AND e.source NOT IN (SELECT value FROM json_each(:replayed))))"
    " ORDER BY t.updated_at, t.id LIMIT :limit"
)


def _delivery(row: Any) -> Delivery:
    handler, seq, status, attempts, first, last, error, replay = row
    return Delivery(
        handler, seq, DeliveryStatus(status), attempts, first, last, error, bool(replay)
    )


def _change(row: Any) -> ChangeRecord:
    seq, task_id, event_id, previous, phase, changed_at, recorded_at, task, kind, trace = row
    return ChangeRecord(
        seq,
        task_id,
        event_id,
        previous,
        phase,
        changed_at,
        recorded_at,
        orjson.loads(task),
        kind,
        trace,
    )


def _entry(row: Any) -> HistoryEntry:
    seq, event_id, kind, fmt, source, received_at, created_at, task_id, raw, receipt = row
    return HistoryEntry(
        seq,
        event_id,
        kind,
        EventFormat(fmt),
        source,
        received_at,
        created_at,
        task_id,
        bytes(raw),
        Receipt.decode(receipt),
    )
