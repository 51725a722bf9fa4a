"""The SQLite schema, as versioned migration steps (see :mod:`consumer.store.migrations`).

A database's version is ``PRAGMA user_version``; version 0 with an ``events`` table is
version 1 (written before the schema carried a version). Opening a
:class:`~consumer.store.sqlite.store.SQLiteStore` applies the steps past it, each in its
own ``BEGIN IMMEDIATE`` transaction together with the new ``user_version``, so two
processes opening one file at once migrate it once. A new database runs every step.

Adding a step
-------------
Append ``Migration(n + 1, "what it does", _SQL)`` to :data:`MIGRATIONS`; never edit a
step that was released (databases out there ran it as it was). Then bring
:data:`~consumer.store.sqlite.schema.SCHEMA` (the reference of the latest schema) to the
same result: ``tests/store/test_sqlite_migrations.py`` checks that a new database, one
migrated from version 1 and one made from ``SCHEMA`` have the same tables, columns and
indexes, and that a version-1 database reads back the same after migrating.

A step is plain SQL, one or more statements (run one by one, see :func:`statements`,
inside the transaction: no ``BEGIN``/``COMMIT``, no ``VACUUM``, and no ``PRAGMA`` that
does nothing inside a transaction, such as ``foreign_keys``). SQLite's ``ALTER TABLE``
only renames and adds columns: to change a column, a constraint or a primary key,
rename the old table away, create the new one under the real name (so that
``sqlite_master`` holds the same text as a new database), copy the rows, keep the
``AUTOINCREMENT`` high-water mark (``sqlite_sequence``) where the table has one, drop
the old table, and create the indexes, as step 2 does.
"""

from __future__ import annotations

import sqlite3

from consumer.store.migrations import Migration, check_steps

__all__ = ["MIGRATIONS", "statements"]

# Version 1: the schema as the unversioned releases last wrote it (git 2f31b84 to
# 5981561, consumer/sqlite_store.py), verbatim. Events are deduplicated by event id
# across the store (``events.event_id UNIQUE``) and the view, history and outbox are
# keyed by task id.
_V1 = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL UNIQUE,
    task_id     TEXT,
    kind        TEXT    NOT NULL,
    format      TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    created_at  NUMERIC NOT NULL,
    updated_at  NUMERIC,
    raw         BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_task ON events (task_id, seq) WHERE task_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS tasks (
    id         TEXT    PRIMARY KEY,
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
    task_id        TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    previous_phase TEXT,
    phase          TEXT    NOT NULL,
    changed_at     NUMERIC NOT NULL,
    recorded_at    INTEGER NOT NULL,
    task           BLOB    NOT NULL,
    kind           TEXT    NOT NULL DEFAULT 'phase'
);
CREATE INDEX IF NOT EXISTS changes_by_task ON changes (task_id, seq);
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
    id         TEXT    PRIMARY KEY,
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

# Version 2 (git ec219c3): every task gets a local number at first sight
# (``task_numbers``), the history and the outbox carry it (``task_no``) and are indexed
# by it, the view and the rebuild staging table are keyed by it, and events are
# deduplicated within their task, by ``(task_no, event_id)``. See the locality note in
# :mod:`consumer.store.sqlite.schema`.
#
# What it does to the data: nothing is lost. Every column of version 1 is copied as it
# is (the seqs of the history and the outbox included, so delivery records, handler
# cursors and replay checkpoints still point at the same rows; so are task versions,
# documents and fold keys); deliveries, cursors, meta and leases are not touched. Tasks
# are numbered in the order of their first event in the history, as version 2 would have
# numbered them had it received that history; ids found only in the view, the outbox or
# the rebuild staging table (none, in a database version 1 wrote) come after them. The
# event-id uniqueness across tasks becomes uniqueness within a task: looser, so every
# version-1 row fits. The ``AUTOINCREMENT`` high-water marks of events and changes are
# carried over, so new seqs follow the old ones (the outbox hands them out from
# ``sqlite_sequence``).
#
# Every table is copied once: on a large history, the migration takes about as long as
# writing the database again and needs as much free disk (and WAL) as its size.
#
# It starts by running version 1's statements again (all ``IF NOT EXISTS``), as every
# version-1 open did: unversioned releases older than 2f31b84 did not create every table
# yet (``tasks_rebuild``, ``meta``, ``cursors``, ``deliveries``, ``leases``). A database
# from before 759999d (``changes.dispatched`` where version 1 has ``kind``), which no
# later release could write to either, fails this step with "no such column: c.kind" and
# is left as it was.
_TO_V2 = """
ALTER TABLE events RENAME TO v1_events;
ALTER TABLE tasks RENAME TO v1_tasks;
ALTER TABLE changes RENAME TO v1_changes;
ALTER TABLE tasks_rebuild RENAME TO v1_tasks_rebuild;
CREATE TABLE events (
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
CREATE TABLE task_numbers (
    no INTEGER PRIMARY KEY,
    id TEXT    NOT NULL UNIQUE
);
CREATE TABLE tasks (
    no         INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL,
    type       TEXT,
    phase      TEXT    NOT NULL,
    updated_at NUMERIC NOT NULL,
    version    INTEGER NOT NULL,
    doc        BLOB    NOT NULL,
    keys       BLOB    NOT NULL
);
CREATE TABLE changes (
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
CREATE TABLE tasks_rebuild (
    no         INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    type       TEXT,
    phase      TEXT    NOT NULL,
    updated_at NUMERIC NOT NULL,
    doc        BLOB    NOT NULL,
    keys       BLOB    NOT NULL
);
INSERT INTO task_numbers (no, id)
SELECT row_number() OVER (ORDER BY min(first) IS NULL, min(first), id), id
FROM (
    SELECT task_id AS id, min(seq) AS first FROM v1_events
    WHERE task_id IS NOT NULL GROUP BY task_id
    UNION ALL SELECT id, NULL FROM v1_tasks
    UNION ALL SELECT task_id, NULL FROM v1_changes
    UNION ALL SELECT id, NULL FROM v1_tasks_rebuild
)
GROUP BY id;
INSERT INTO events (seq, event_id, task_no, task_id, kind, format, source, received_at,
                    created_at, updated_at, raw)
SELECT e.seq, e.event_id, n.no, e.task_id, e.kind, e.format, e.source, e.received_at,
       e.created_at, e.updated_at, e.raw
FROM v1_events AS e LEFT JOIN task_numbers AS n ON n.id = e.task_id
ORDER BY e.seq;
INSERT INTO tasks (no, id, type, phase, updated_at, version, doc, keys)
SELECT n.no, t.id, t.type, t.phase, t.updated_at, t.version, t.doc, t.keys
FROM v1_tasks AS t JOIN task_numbers AS n ON n.id = t.id
ORDER BY n.no;
INSERT INTO changes (seq, task_no, task_id, event_id, previous_phase, phase, changed_at,
                     recorded_at, task, kind)
SELECT c.seq, n.no, c.task_id, c.event_id, c.previous_phase, c.phase, c.changed_at,
       c.recorded_at, c.task, c.kind
FROM v1_changes AS c JOIN task_numbers AS n ON n.id = c.task_id
ORDER BY c.seq;
INSERT INTO tasks_rebuild (no, id, type, phase, updated_at, doc, keys)
SELECT n.no, r.id, r.type, r.phase, r.updated_at, r.doc, r.keys
FROM v1_tasks_rebuild AS r JOIN task_numbers AS n ON n.id = r.id
ORDER BY n.no;
DELETE FROM sqlite_sequence WHERE name IN ('events', 'changes');
INSERT INTO sqlite_sequence (name, seq)
SELECT substr(name, 4), seq FROM sqlite_sequence WHERE name IN ('v1_events', 'v1_changes');
DROP TABLE v1_events;
DROP TABLE v1_tasks;
DROP TABLE v1_changes;
DROP TABLE v1_tasks_rebuild;
CREATE UNIQUE INDEX events_by_task ON events (task_no, event_id)
    WHERE task_no IS NOT NULL;
CREATE UNIQUE INDEX events_untasked ON events (event_id) WHERE task_no IS NULL;
CREATE INDEX tasks_by_updated ON tasks (updated_at, id);
CREATE INDEX tasks_by_phase ON tasks (phase, updated_at, id);
CREATE INDEX changes_by_task ON changes (task_no, seq);
"""

# Version 3: receipts. Each history row may keep its receipt (which webhook secret
# verified the delivery, the request's W3C traceparent: consumer.core.receipt, as
# compact JSON) and each outbox row the traceparent of the event that made the change.
# Two added columns, NULL in the rows already there (nothing was known then); no row is
# rewritten, so the step takes no time whatever the database's size.
_TO_V3 = """
ALTER TABLE events ADD COLUMN receipt TEXT;
ALTER TABLE changes ADD COLUMN traceparent TEXT;
"""

# Version 4: stale alerts. One row per (task, phase, status.updatedAt, threshold) the
# sweeper alerted on, with the seq of the change it recorded, so that each is alerted
# once whoever sweeps. By task number (the locality note in schema.py), without rowid:
# the primary key is the only lookup. A new table: no row is rewritten.
_TO_V4 = """
CREATE TABLE stale_alerts (
    task_no      INTEGER NOT NULL,
    phase        TEXT    NOT NULL,
    updated_at   NUMERIC NOT NULL,
    stale_for_ms INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (task_no, phase, updated_at, stale_for_ms)
) WITHOUT ROWID;
"""

MIGRATIONS: list[Migration] = [
    Migration(1, "history, view, outbox, deliveries, leases (by task id)", _V1),
    Migration(
        2, "number tasks; history and outbox by task number, dedup within a task", _V1 + _TO_V2
    ),
    Migration(3, "receipts in the history, traceparent in the outbox", _TO_V3),
    Migration(4, "stale alerts", _TO_V4),
]
check_steps(MIGRATIONS)


def statements(sql: str) -> list[str]:
    """``sql`` cut into its statements, to run one by one inside a transaction (the
    sqlite3 module's ``executescript`` commits the open transaction first). Cuts only
    where a statement is complete, so a ``;`` inside a string literal or a trigger body
    stays where it is."""
    out: list[str] = []
    pending = ""
    for piece in sql.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                out.append(pending.strip())
            pending = ""
    if pending.strip(" \t\n;"):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending!r}")
    return out
