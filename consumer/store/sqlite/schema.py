"""The SQLite store's schema, its version, and how a writer takes the lock.

The schema is built by the steps in :mod:`consumer.store.sqlite.migrations`; ``SCHEMA``
here is the reference of the latest one (with why it looks as it does), which a test
holds the steps to. ``SCHEMA_VERSION`` is the latest step's number.

Writers are several: the service's writer (thread or process) and CLI commands on the
same file; :func:`begin_immediate` is how each starts a write transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time

from consumer.store.sqlite.migrations import MIGRATIONS

__all__ = ["CHUNK", "SCHEMA", "SCHEMA_VERSION", "begin_immediate", "rollback"]

SCHEMA_VERSION = len(MIGRATIONS)

# Locality is the performance story here. Task ids and event ids are random strings; an
# index keyed on them takes each batch's inserts on as many random leaf pages, and every
# dirtied page is written whole to the WAL at commit (and again at checkpoint), so writes
# grew with the database. Each task therefore gets a local number (``tasks.no``) at first
# sight: tasks alive together have neighbouring numbers, and the history and outbox are
# indexed by it, so a batch's index inserts land on a few pages at the tail. Only the
# first event of a task touches a random index (``task_numbers.id``). The numbers belong
# to the history, not to the view, so a rebuild can repair a view that lost rows.
#
# The latest schema, for reference: databases get it from MIGRATIONS (change it there,
# by a new step, and here to match). ``events.receipt`` and ``changes.traceparent`` are
# written the way SQLite keeps a table's text after ``ALTER TABLE ... ADD COLUMN`` (step
# 3 added them), so that this text and a migrated database's are the same.
SCHEMA = """
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
, receipt TEXT);
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
, traceparent TEXT);
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
CREATE TABLE IF NOT EXISTS stale_alerts (
    task_no      INTEGER NOT NULL,
    phase        TEXT    NOT NULL,
    updated_at   NUMERIC NOT NULL,
    stale_for_ms INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (task_no, phase, updated_at, stale_for_ms)
) WITHOUT ROWID;
"""

CHUNK = 500  # stays far below SQLite's bound-parameter limit


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


def rollback(con: sqlite3.Connection) -> None:
    """Undo the transaction a failure interrupted, without hiding that failure. SQLite
    rolls some transactions back by itself (a full disk, an I/O error), and a ROLLBACK
    then raises "cannot rollback - no transaction is active", which would replace the
    real cause ("database or disk is full") in every log and error above."""
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
