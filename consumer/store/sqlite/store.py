"""SQLite :class:`~consumer.store.Store`: the embedded default. The only module that
speaks SQLite.

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
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import orjson

from consumer.core.change import ChangeRecord
from consumer.core.codec import Event, EventFormat, decode
from consumer.core.fold import TaskState
from consumer.core.plan import BatchPlan, DedupKey, decode_keys, dedup_key, encode_keys, plan_batch
from consumer.store.base import (
    Cursor,
    Delivery,
    DeliveryStatus,
    HistoryEntry,
    IngestResult,
    RawIngestResult,
    StoredTask,
    StoreStats,
    TaskPage,
    TaskQuery,
    ingest_decoded,
)

__all__ = [
    "SCHEMA_VERSION",
    "Current",
    "Rows",
    "SQLiteStore",
    "begin_immediate",
    "known_events",
    "plan_rows",
    "read_current",
    "read_for_planning",
    "write_rows",
]

T = TypeVar("T")
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

SCHEMA_VERSION = 2

# Locality is the performance story here. Task ids and event ids are random strings; an
# index keyed on them takes each batch's inserts on as many random leaf pages, and every
# dirtied page is written whole to the WAL at commit (and again at checkpoint), so writes
# grew with the database. Each task therefore gets a local number (``tasks.no``) at first
# sight: tasks alive together have neighbouring numbers, and the history and outbox are
# indexed by it, so a batch's index inserts land on a few pages at the tail. Only the
# first event of a task touches a random index (``task_numbers.id``). The numbers belong
# to the history, not to the view, so a rebuild can repair a view that lost rows.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL,
    task_no     INTEGER,
    task_id     TEXT,
    kind        TEXT    NOT NULL,
    format      TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    created_at  NUMERIC NOT NULL,
    updated_at  NUMERIC,
    raw         BLOB    NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_task ON events (task_no, event_id)
    WHERE task_no IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS events_untasked ON events (event_id) WHERE task_no IS NULL;
CREATE TABLE IF NOT EXISTS task_numbers (
    no INTEGER PRIMARY KEY,
    id TEXT    NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS tasks (
    no         INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL,
    type       TEXT,
    phase      TEXT    NOT NULL,
    updated_at NUMERIC NOT NULL,
    version    INTEGER NOT NULL,
    doc        BLOB    NOT NULL,
    keys       BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_updated ON tasks (updated_at, id);
CREATE INDEX IF NOT EXISTS tasks_by_phase ON tasks (phase, updated_at, id);
CREATE TABLE IF NOT EXISTS changes (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    task_no        INTEGER NOT NULL,
    task_id        TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    previous_phase TEXT,
    phase          TEXT    NOT NULL,
    changed_at     NUMERIC NOT NULL,
    recorded_at    INTEGER NOT NULL,
    task           BLOB    NOT NULL,
    kind           TEXT    NOT NULL DEFAULT 'phase'
);
CREATE INDEX IF NOT EXISTS changes_by_task ON changes (task_no, seq);
CREATE TABLE IF NOT EXISTS deliveries (
    handler          TEXT    NOT NULL,
    seq              INTEGER NOT NULL,
    replay           INTEGER NOT NULL,
    status           TEXT    NOT NULL,
    attempts         INTEGER NOT NULL,
    first_attempt_at INTEGER NOT NULL,
    last_attempt_at  INTEGER NOT NULL,
    error            TEXT,
    PRIMARY KEY (handler, seq, replay)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_attention ON deliveries (status, seq)
    WHERE status IN ('dead', 'redrive', 'failing');
CREATE TABLE IF NOT EXISTS tasks_rebuild (
    no         INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    type       TEXT,
    phase      TEXT    NOT NULL,
    updated_at NUMERIC NOT NULL,
    doc        BLOB    NOT NULL,
    keys       BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    handler TEXT    PRIMARY KEY,
    seq     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT    PRIMARY KEY,
    owner      TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
"""

_CHUNK = 500  # stays far below SQLite's bound-parameter limit


_LOCK_WAIT_S = 10.0


def begin_immediate(con: sqlite3.Connection) -> None:
    """Start a write transaction, waiting up to 10 s for another writer to finish.

    Not SQLite's busy timeout: its handler sleeps 1, 2, 5, 10 ... up to 100 ms between
    tries, so a writer that finds the lock taken by a busy neighbour (the service's
    writer process, a CLI import) often sleeps long after it was released. Delivery
    records waited hundreds of milliseconds behind the writer process that way. Here
    the waits stay under 2 ms."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    delay = 0.0001
    while True:
        try:
            con.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


def path_from_url(url: str) -> Path:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db`` to a path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"not a SQLite URL (expected sqlite:///PATH): {url!r}")
    return Path(url[len(prefix) :])


class SQLiteStore:
    def __init__(
        self, path: Path | str, *, synchronous: Synchronous = "FULL", record_updates: bool = False
    ) -> None:
        self.path = Path(path)
        self.record_updates = record_updates
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
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA busy_timeout = 10000")
        if writer:
            con.execute("PRAGMA journal_mode = WAL")
            self._ensure_schema(con)
            # From here on the writer waits in begin_immediate, finer grained.
            con.execute("PRAGMA busy_timeout = 0")
        con.execute(f"PRAGMA synchronous = {self._synchronous}")
        return con

    def _ensure_schema(self, con: sqlite3.Connection) -> None:
        (version,) = con.execute("PRAGMA user_version").fetchone()
        if (
            version == 0
            and con.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone()
        ):
            version = 1  # written before the schema carried a version
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(
                f"{self.path} holds phasewatch schema {version}, this version needs"
                f" {SCHEMA_VERSION}: export its history with the phasewatch that wrote it"
                " (phasewatch export -o FILE), then import FILE into a new database"
            )
        con.executescript(_SCHEMA)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
    ) -> RawIngestResult:
        del keys
        return await ingest_decoded(self, raws, source, received_at, record_changes=record_changes)

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
                con.execute("ROLLBACK")
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
        def run(con: sqlite3.Connection) -> str:
            con.execute(
                "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at"
                " WHERE leases.owner IN (excluded.owner, ?) OR leases.expires_at < ?",
                (name, owner, now_ms + ttl_ms, take_from, now_ms),
            )
            (holder,) = con.execute("SELECT owner FROM leases WHERE name = ?", (name,)).fetchone()
            return str(holder)

        return await self._write(run)

    async def release_lease(self, name: str, owner: str) -> None:
        await self._write(
            lambda con: con.execute(
                "DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner)
            )
        )

    # ------------------------------------------------------------ reads

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
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
        sql = (
            "SELECT seq, event_id, kind, format, source, received_at, created_at, task_id, raw"  # noqa: S608
            f" FROM events WHERE {where} ORDER BY seq LIMIT ?"
        )
        rows = await self._read(sql, [*params, limit])
        return [
            HistoryEntry(seq, eid, kind, EventFormat(fmt), src, rcv, created, tid, bytes(raw))
            for seq, eid, kind, fmt, src, rcv, created, tid, raw in rows
        ]

    async def task_ids_after(self, after: str | None, limit: int = 500) -> list[str]:
        rows = await self._read(
            "SELECT id FROM task_numbers WHERE id > ? ORDER BY id LIMIT ?",
            (after or "", limit),
        )
        return [row[0] for row in rows]

    async def history_of_tasks(self, task_ids: Sequence[str], upto_seq: int) -> list[HistoryEntry]:
        def run() -> list[Any]:
            sql = (
                "SELECT seq, event_id, kind, format, source, received_at, created_at, task_id,"
                " raw FROM events WHERE task_no IN (SELECT no FROM task_numbers WHERE id IN ({}))"
                " AND seq <= ?"
            )
            out: list[Any] = []
            for start in range(0, len(task_ids), _CHUNK):
                chunk = list(task_ids[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                out.extend(self._r().execute(sql.format(marks), [*chunk, upto_seq]).fetchall())
            return out

        rows = await self._run(self._reader, run)
        entries = [
            HistoryEntry(seq, eid, kind, EventFormat(fmt), src, rcv, created, tid, bytes(raw))
            for seq, eid, kind, fmt, src, rcv, created, tid, raw in rows
        ]
        entries.sort(key=lambda e: (e.task_id or "", e.seq))
        return entries

    async def stage_rebuilt(self, states: Mapping[str, TaskState]) -> None:
        rows = [_task_row(task_id, s) for task_id, s in states.items()]
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
                for task_id, doc, keys in _select_in(
                    con, "SELECT id, doc, keys FROM tasks_rebuild WHERE id IN ({})", touched
                )
            }
            plan = plan_batch(late, (), staged)
            con.executemany(
                _STAGE_REBUILT,
                [_task_row(task_id, s) for task_id, s in plan.states.items()],
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
            return _select_in(self._r(), f"{_CHANGE_COLUMNS} WHERE seq IN ({{}})", list(seqs))

        rows = await self._run(self._reader, run)
        return sorted((_change(row) for row in rows), key=lambda c: c.seq)

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
            for start in range(0, len(values), _CHUNK):
                chunk = values[start : start + _CHUNK]
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

    async def stats(self) -> StoreStats:
        rows = await self._read(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM tasks),"
            " (SELECT count(*) FROM changes), (SELECT coalesce(max(seq), 0) FROM changes),"
            " (SELECT coalesce(max(seq), 0) FROM events)"
        )
        events, tasks, changes, last, last_event = rows[0]
        return StoreStats(events, tasks, changes, last, last_event)


# A staged task keeps the number its history is filed under.
_STAGE_REBUILT = (
    "INSERT OR REPLACE INTO tasks_rebuild (no, id, type, phase, updated_at, doc, keys)"
    " VALUES ((SELECT no FROM task_numbers WHERE id = ?1), ?1, ?2, ?3, ?4, ?5, ?6)"
)
_NO = "(SELECT no FROM task_numbers WHERE id = ?)"

_CHANGE_COLUMNS = (
    "SELECT seq, task_id, event_id, previous_phase, phase, changed_at, recorded_at, task, kind"
    " FROM changes"
)


_DELIVERY_COLUMNS = (
    "SELECT handler, seq, status, attempts, first_attempt_at, last_attempt_at, error, replay"
    " FROM deliveries"
)


def _delivery(row: Any) -> Delivery:
    handler, seq, status, attempts, first, last, error, replay = row
    return Delivery(
        handler, seq, DeliveryStatus(status), attempts, first, last, error, bool(replay)
    )


def _change(row: Any) -> ChangeRecord:
    seq, task_id, event_id, previous, phase, changed_at, recorded_at, task, kind = row
    return ChangeRecord(
        seq, task_id, event_id, previous, phase, changed_at, recorded_at, orjson.loads(task), kind
    )


@dataclass(slots=True)
class Current:
    """A task as the write transaction finds it: its number, and its view row (None when
    the view has no row: a rebuild repairs a lost one)."""

    no: int
    doc: bytes | None
    keys: bytes | None
    version: int


def read_current(con: sqlite3.Connection, task_ids: Iterable[str]) -> dict[str, Current]:
    """The numbered tasks among ``task_ids`` (a task with no number has no history)."""
    return {
        task_id: Current(no, doc, keys, version or 0)
        for no, task_id, doc, keys, version in _select_in(
            con,
            "SELECT n.no, n.id, t.doc, t.keys, t.version FROM task_numbers AS n"
            " LEFT JOIN tasks AS t ON t.no = n.no WHERE n.id IN ({})",
            list(task_ids),
        )
    }


class EventRow(NamedTuple):
    """A new history row, before it is given its task number."""

    event_id: str
    task_id: str | None
    kind: str
    format: str
    created_at: int | float
    updated_at: int | float | None
    raw: bytes


class TaskRow(NamedTuple):
    """A view row to write. ``bumped``: the materialized task changed (version + 1)."""

    task_id: str
    type: str | None
    phase: str
    updated_at: int | float
    doc: bytes
    keys: bytes
    bumped: bool


class ChangeRow(NamedTuple):
    """An outbox row; its seq follows the store's last one, in order."""

    task_id: str
    event_id: str
    previous_phase: str | None
    phase: str
    changed_at: int | float
    task: bytes  # the materialized task right after the change, as JSON
    kind: str


@dataclass(slots=True)
class Rows:
    """A planned batch as the rows it writes: named tuples of plain values, so that a
    batch planned in one process can be written by another."""

    events: list[EventRow]
    tasks: list[TaskRow]
    changes: list[ChangeRow]


def plan_rows(plan: BatchPlan) -> Rows:
    """The rows that write ``plan``. Pure."""
    return Rows(
        [
            EventRow(e.id, e.task_id, e.kind, e.format.value, e.created_at, e.updated_at, e.raw)
            for e in plan.new_events
        ],
        [
            TaskRow(*_task_row(task_id, s), task_id in plan.versions_bumped)
            for task_id, s in plan.states.items()
        ],
        [
            ChangeRow(
                c.task_id,
                c.event_id,
                c.previous_phase,
                c.phase,
                c.changed_at,
                orjson.dumps(c.task),
                c.kind,
            )
            for c in plan.changes
        ],
    )


def write_rows(
    con: sqlite3.Connection,
    rows: Rows,
    current: Mapping[str, Current],
    source: str,
    received_at: int,
) -> int:
    """Write a planned batch inside the caller's transaction; ``current`` holds at least
    the numbered tasks among those the rows touch. Returns the outbox seq the batch's
    changes follow (the first is that plus one)."""
    numbers = {task_id: c.no for task_id, c in current.items()}
    new_tasks = [row.task_id for row in rows.tasks if row.task_id not in numbers]
    if new_tasks:
        # We hold the write lock: the next numbers are ours to hand out.
        (top,) = con.execute("SELECT coalesce(max(no), 0) FROM task_numbers").fetchone()
        fresh = list(zip(range(top + 1, top + 1 + len(new_tasks)), new_tasks, strict=True))
        con.executemany("INSERT INTO task_numbers (no, id) VALUES (?, ?)", fresh)
        numbers.update((task_id, no) for no, task_id in fresh)
    con.executemany(
        "INSERT INTO events (event_id, task_no, task_id, kind, format, source, received_at,"
        " created_at, updated_at, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                event_id,
                None if task_id is None else numbers[task_id],
                task_id,
                kind,
                fmt,
                source,
                received_at,
                created_at,
                updated_at,
                raw,
            )
            for event_id, task_id, kind, fmt, created_at, updated_at, raw in rows.events
        ],
    )
    con.executemany(
        "INSERT INTO tasks (no, id, type, phase, updated_at, doc, keys, version)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (no) DO UPDATE SET type = excluded.type,"
        " phase = excluded.phase, updated_at = excluded.updated_at,"
        " version = excluded.version, doc = excluded.doc, keys = excluded.keys",
        [
            (
                numbers[task_id],
                task_id,
                task_type,
                phase,
                updated_at,
                doc,
                keys,
                (c.version if (c := current.get(task_id)) is not None else 0) + bumped,
            )
            for task_id, task_type, phase, updated_at, doc, keys, bumped in rows.tasks
        ],
    )
    row = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    base: int = row[0] if row else 0
    if rows.changes:
        # Explicit seqs let one executemany replace a RETURNING round trip per change.
        con.executemany(
            "INSERT INTO changes (seq, task_no, task_id, event_id, previous_phase, phase,"
            " changed_at, recorded_at, task, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    seq,
                    numbers[task_id],
                    task_id,
                    event_id,
                    previous,
                    phase,
                    changed_at,
                    received_at,
                    task,
                    kind,
                )
                for seq, (task_id, event_id, previous, phase, changed_at, task, kind) in enumerate(
                    rows.changes, start=base + 1
                )
            ],
        )
    return base


def read_for_planning(
    con: sqlite3.Connection, task_ids: Sequence[str], untasked: Sequence[str]
) -> tuple[dict[str, tuple[bytes | None, bytes | None, set[str]]], set[str]]:
    """For a planner (:mod:`consumer.store.sqlite.planner`), in one read transaction: the view
    row and event ids of each of ``task_ids`` that has a history, and which of the
    ``untasked`` event ids are stored."""
    con.execute("BEGIN")
    try:
        current = read_current(con, task_ids)
        tasks = {task_id: (c.doc, c.keys, set[str]()) for task_id, c in current.items()}
        for task_id, event_id in _select_in(
            con,
            "SELECT n.id, e.event_id FROM task_numbers AS n JOIN events AS e"
            " ON e.task_no = n.no WHERE n.id IN ({})",
            list(current),
        ):
            tasks[task_id][2].add(event_id)
        known = {
            event_id
            for (event_id,) in _select_in(
                con,
                "SELECT event_id FROM events WHERE task_no IS NULL AND event_id IN ({})",
                list(untasked),
            )
        }
    finally:
        con.execute("COMMIT")
    return tasks, known


def known_events(
    con: sqlite3.Connection, keys: Iterable[DedupKey], numbers: Mapping[str, int]
) -> list[DedupKey]:
    """The keys among ``keys`` that the history already holds. A task not numbered yet
    has no history, so only known tasks' events are looked up, by (task no, event id)."""
    pairs: set[tuple[int, str]] = set()
    untasked: set[str] = set()
    for task_id, event_id in keys:
        if task_id is None:
            untasked.add(event_id)
        elif (no := numbers.get(task_id)) is not None:
            pairs.add((no, event_id))
    ids = {no: task_id for task_id, no in numbers.items()}
    known: list[DedupKey] = []
    chunks = list(pairs)
    for start in range(0, len(chunks), _CHUNK // 2):
        chunk = chunks[start : start + _CHUNK // 2]
        values = ",".join("(?, ?)" for _ in chunk)
        found = con.execute(
            f"SELECT e.task_no, e.event_id FROM (VALUES {values}) AS v"  # noqa: S608
            " JOIN events AS e ON e.task_no = v.column1 AND e.event_id = v.column2",
            [x for pair in chunk for x in pair],
        ).fetchall()
        known.extend((ids[no], event_id) for no, event_id in found)
    known.extend(
        (None, event_id)
        for (event_id,) in _select_in(
            con,
            "SELECT event_id FROM events WHERE task_no IS NULL AND event_id IN ({})",
            list(untasked),
        )
    )
    return known


def _select_in(con: sqlite3.Connection, sql: str, values: Sequence[str | int]) -> list[Any]:
    rows: list[Any] = []
    for start in range(0, len(values), _CHUNK):
        chunk = values[start : start + _CHUNK]
        rows.extend(con.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall())
    return rows


def _task_row(
    task_id: str, state: TaskState
) -> tuple[str, str | None, str, int | float, bytes, bytes]:
    return (
        task_id,
        _text_or_none(state.task.get("type")),
        state.phase,
        state.updated_at,
        orjson.dumps(state.task),
        encode_keys(state.keys),
    )


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
