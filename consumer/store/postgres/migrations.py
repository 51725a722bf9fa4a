"""The PostgreSQL schema, as versioned migration steps (see :mod:`consumer.store.migrations`).

Applied by :class:`~consumer.store.postgres.store.PostgresStore` at open (or by
``phasewatch migrate``) under a session advisory lock, so replicas starting together
migrate once; the version lives in ``schema_version``. Add a step at the end to change
the schema; never edit a released one.

Why the tables look as they do:

* ``counters`` is one row holding the last history and outbox seqs. A writer takes it
  (``UPDATE ... RETURNING``) as the last statement before ``COMMIT``, so its row lock
  serializes seq allocation *with commit*: seqs become visible in commit order, the
  store contract's rule, which a plain sequence breaks (sequences are handed out at
  insert and commit in any order). It also keeps exact counts, since ``count(*)`` on a
  large table is a scan.
* ``task_ids`` holds one row per task with history. Writers lock those rows, in id
  order, before they read the view: two replicas folding the same task take turns
  instead of losing an update, and a fixed order cannot deadlock.
* Times are ``double precision``: Livepeer's are Unix milliseconds, which it holds
  exactly (below 2^53); they read back as ints when integral.
"""

from __future__ import annotations

from consumer.store.migrations import Migration, check_steps

__all__ = ["MIGRATIONS"]

_INITIAL = """
CREATE TABLE counters (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    events  bigint  NOT NULL,
    changes bigint  NOT NULL,
    tasks   bigint  NOT NULL
);
INSERT INTO counters (one, events, changes, tasks) VALUES (true, 0, 0, 0);
CREATE TABLE task_ids (
    id text PRIMARY KEY
);
CREATE TABLE events (
    seq         bigint PRIMARY KEY,
    event_id    text   NOT NULL,
    task_id     text,
    kind        text   NOT NULL,
    format      text   NOT NULL,
    source      text   NOT NULL,
    received_at bigint NOT NULL,
    created_at  double precision NOT NULL,
    updated_at  double precision,
    raw         bytea  NOT NULL
);
CREATE UNIQUE INDEX events_by_task ON events (task_id, event_id) WHERE task_id IS NOT NULL;
CREATE UNIQUE INDEX events_untasked ON events (event_id) WHERE task_id IS NULL;
CREATE TABLE tasks (
    id         text   PRIMARY KEY,
    type       text,
    phase      text   NOT NULL,
    updated_at double precision NOT NULL,
    version    bigint NOT NULL,
    doc        bytea  NOT NULL,
    keys       bytea  NOT NULL
);
CREATE INDEX tasks_by_updated ON tasks (updated_at, id);
CREATE INDEX tasks_by_phase ON tasks (phase, updated_at, id);
CREATE TABLE changes (
    seq            bigint PRIMARY KEY,
    task_id        text   NOT NULL,
    event_id       text   NOT NULL,
    previous_phase text,
    phase          text   NOT NULL,
    changed_at     double precision NOT NULL,
    recorded_at    bigint NOT NULL,
    task           bytea  NOT NULL,
    kind           text   NOT NULL DEFAULT 'phase'
);
CREATE INDEX changes_by_task ON changes (task_id, seq);
CREATE TABLE deliveries (
    handler          text    NOT NULL,
    seq              bigint  NOT NULL,
    replay           boolean NOT NULL,
    status           text    NOT NULL,
    attempts         integer NOT NULL,
    first_attempt_at bigint  NOT NULL,
    last_attempt_at  bigint  NOT NULL,
    error            text,
    PRIMARY KEY (handler, seq, replay)
);
CREATE INDEX deliveries_attention ON deliveries (status, seq)
    WHERE status IN ('dead', 'redrive', 'failing');
CREATE TABLE tasks_rebuild (
    id         text PRIMARY KEY,
    type       text,
    phase      text NOT NULL,
    updated_at double precision NOT NULL,
    doc        bytea NOT NULL,
    keys       bytea NOT NULL
);
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE cursors (
    handler text   PRIMARY KEY,
    seq     bigint NOT NULL
);
CREATE TABLE leases (
    name       text   PRIMARY KEY,
    owner      text   NOT NULL,
    expires_at bigint NOT NULL
);
"""

MIGRATIONS: list[Migration] = [
    Migration(1, "history, view, outbox, deliveries, leases", _INITIAL),
]
check_steps(MIGRATIONS)
