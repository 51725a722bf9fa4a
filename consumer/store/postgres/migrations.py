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
  insert and commit in any order). Its values are the history's and outbox's exact counts.
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
    changes bigint  NOT NULL
);
INSERT INTO counters (one, events, changes) VALUES (true, 0, 0);
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
-- The read half of an ingest transaction in one round trip: lock the batch's tasks in id
-- order (new ids inserted, known ones locked without a rewrite: WHERE false), then read
-- their view rows and which of the batch's events are stored. A function because each
-- of its statements takes a fresh snapshot (VOLATILE, READ COMMITTED): the reads see
-- what a writer that held a lock before us committed. In one plain statement they would
-- read the snapshot from before the lock wait, and lose that writer's update.
CREATE FUNCTION phasewatch_lock_and_read(
    ids text[], event_tasks text[], event_ids text[], untasked text[]
) RETURNS TABLE (
    r_kind smallint, r_id text, r_event_id text, r_doc bytea, r_keys bytea, r_version bigint
) LANGUAGE plpgsql VOLATILE
-- PL/pgSQL keeps each statement's plan for the session; made while the tables were
-- empty, that plan scans them whole forever after (seen in bench/pg_profile.py: 8-12 ms
-- per batch instead of 2). Planning each call with the current statistics is cheap.
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    INSERT INTO task_ids AS t (id) SELECT u.id FROM unnest(ids) AS u(id) ORDER BY u.id
        ON CONFLICT (id) DO UPDATE SET id = excluded.id WHERE false;
    RETURN QUERY SELECT 0::smallint, v.id, NULL::text, v.doc, v.keys, v.version
        FROM tasks AS v WHERE v.id = ANY(ids);
    RETURN QUERY SELECT 1::smallint, e.task_id, e.event_id, NULL::bytea, NULL::bytea,
        NULL::bigint
        FROM unnest(event_tasks, event_ids) AS k(task_id, event_id)
        JOIN events AS e ON e.task_id = k.task_id AND e.event_id = k.event_id;
    RETURN QUERY SELECT 2::smallint, NULL::text, e.event_id, NULL::bytea, NULL::bytea,
        NULL::bigint
        FROM events AS e WHERE e.task_id IS NULL AND e.event_id = ANY(untasked);
END
$$;
"""

# Step 2: receipts. A history row may keep its receipt (which webhook secret verified
# the delivery, the request's W3C traceparent: consumer.core.receipt, as compact JSON)
# and an outbox row the traceparent of the event that made the change. Nullable columns
# without a default: PostgreSQL adds them without rewriting the tables, and the rows
# already there read NULL (nothing was known then).
_RECEIPTS = """
ALTER TABLE events ADD COLUMN receipt text;
ALTER TABLE changes ADD COLUMN traceparent text;
"""

# Step 3: stale alerts. One row per (task, phase, status.updatedAt, threshold) the
# sweeper alerted on, with the seq of the change it recorded: written with that change,
# under the task's row lock, so each is alerted once whichever replica sweeps.
_STALE_ALERTS = """
CREATE TABLE stale_alerts (
    task_id      text   NOT NULL,
    phase        text   NOT NULL,
    updated_at   double precision NOT NULL,
    stale_for_ms bigint NOT NULL,
    seq          bigint NOT NULL,
    PRIMARY KEY (task_id, phase, updated_at, stale_for_ms)
);
"""

MIGRATIONS: list[Migration] = [
    Migration(1, "history, view, outbox, deliveries, leases", _INITIAL),
    Migration(2, "receipts in the history, traceparent in the outbox", _RECEIPTS),
    Migration(3, "stale alerts", _STALE_ALERTS),
]
check_steps(MIGRATIONS)
