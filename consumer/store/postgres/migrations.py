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
  order, before they write the view (and, after a conflict, before they read it): two
  replicas folding the same task take turns, and a fixed order cannot deadlock.
* ``tasks.rev`` (step 4) counts the writes of a view row. An ingest reads without locks
  and writes only where the rev is still the one it read, so no update is lost.
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

# Step 4: optimistic ingest. A batch is read without locks and written by one call of
# phasewatch_write in its own implicit transaction: two round trips instead of four
# (BEGIN, lock and read, write, COMMIT), and the counters row is held only for the
# server's part of the write and its fsync, not for a round trip to the client and back.
# ``rev`` makes that safe: every write of a view row sets it to the rev it read plus one
# (1 for a new task), and the write refuses (serialization_failure, nothing written) when
# a row is no longer at the rev it read, or was created or deleted since. The writer then
# reads again, under the task_ids row locks as before (phasewatch_read with take_locks), so a
# batch whose tasks are contended still always gets through. The write takes those same
# locks, in id order, before it touches a view row: writers of a task take turns, and a
# locked read never sees its rows move. The old read function goes: a replica of the
# previous version would write rows without bumping rev, so it must fail, loudly, rather
# than overwrite a newer one's update.
_OPTIMISTIC = """
ALTER TABLE tasks ADD COLUMN rev bigint NOT NULL DEFAULT 1;
-- Task ids in byte order (Python's and SQLite's), so the primary key serves the rebuild's
-- walk through them (task_ids_after): in the database's collation it could not, and every
-- step of that walk sorted the whole table again.
ALTER TABLE task_ids ALTER COLUMN id TYPE text COLLATE "C";
DROP FUNCTION phasewatch_lock_and_read(text[], text[], text[], text[]);
-- The view rows of the batch's tasks (kind 0, with their rev), which of its events are
-- stored (1: task events, 2: untasked ones). With ``take_locks``, first the task_ids row locks,
-- as phasewatch_lock_and_read did; each statement then reads what a writer that held a
-- lock before us committed (a fresh snapshot per statement: VOLATILE, READ COMMITTED).
CREATE FUNCTION phasewatch_read(
    take_locks boolean, ids text[], event_tasks text[], event_ids text[], untasked text[]
) RETURNS TABLE (
    r_kind smallint, r_id text, r_event_id text, r_doc bytea, r_keys bytea, r_version bigint,
    r_rev bigint
) LANGUAGE plpgsql VOLATILE
-- PL/pgSQL keeps each statement's plan for the session; made while the tables were
-- empty, that plan scans them whole forever after. Planning each call is cheap.
SET plan_cache_mode = force_custom_plan
-- A batch's rows are found by key, one index probe each: that is right for any batch
-- against any table size. Left to its estimates, the planner sorted and merge-joined
-- the whole history for a batch of 2,000 against 100k events (90 ms instead of 3),
-- a cost that grows with the history.
SET enable_mergejoin = off
SET enable_hashjoin = off
AS $$
BEGIN
    IF take_locks THEN
        INSERT INTO task_ids AS t (id) SELECT u.id FROM unnest(ids) AS u(id)
            ORDER BY u.id COLLATE "C"
            ON CONFLICT (id) DO UPDATE SET id = excluded.id WHERE false;
    END IF;
    RETURN QUERY SELECT 0::smallint, v.id, NULL::text, v.doc, v.keys, v.version, v.rev
        FROM tasks AS v WHERE v.id = ANY(ids);
    RETURN QUERY SELECT 1::smallint, e.task_id, e.event_id, NULL::bytea, NULL::bytea,
        NULL::bigint, NULL::bigint
        FROM unnest(event_tasks, event_ids) AS k(task_id, event_id)
        JOIN events AS e ON e.task_id = k.task_id AND e.event_id = k.event_id;
    RETURN QUERY SELECT 2::smallint, NULL::text, e.event_id, NULL::bytea, NULL::bytea,
        NULL::bigint, NULL::bigint
        FROM events AS e WHERE e.task_id IS NULL AND e.event_id = ANY(untasked);
END
$$;
-- A planned batch, written. ``lock_ids``: the tasks of its new events, sorted. The view
-- rows come as two sets: tasks read as absent (inserted with rev 1) and tasks read at
-- rev r (updated to r + 1 only where still at r). Then the seqs (the counters row lock,
-- held until COMMIT, so seqs become visible in commit order), the history and the
-- outbox. Returns the last history and outbox seqs.
CREATE FUNCTION phasewatch_write(
    lock_ids text[],
    n_ids text[], n_types text[], n_phases text[], n_updated float8[], n_versions bigint[],
    n_docs bytea[], n_keys bytea[],
    o_ids text[], o_types text[], o_phases text[], o_updated float8[], o_versions bigint[],
    o_docs bytea[], o_keys bytea[], o_revs bigint[],
    n_events integer, n_changes integer, src text, received bigint,
    e_ids text[], e_tasks text[], e_kinds text[], e_formats text[], e_created float8[],
    e_updated float8[], e_raw bytea[], e_receipts text[],
    c_tasks text[], c_events text[], c_previous text[], c_phases text[], c_at float8[],
    c_docs bytea[], c_kinds text[], c_traceparents text[]
) RETURNS TABLE (top_events bigint, top_changes bigint) LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    written bigint;
    ev_top bigint;
    ch_top bigint;
BEGIN
    -- In the column's order (byte order), as the stale sweeper takes them.
    INSERT INTO task_ids AS t (id) SELECT u.id FROM unnest(lock_ids) AS u(id)
        ORDER BY u.id COLLATE "C"
        ON CONFLICT (id) DO UPDATE SET id = excluded.id WHERE false;
    IF cardinality(o_ids) > 0 THEN
        UPDATE tasks AS t SET type = u.type, phase = u.phase, updated_at = u.updated_at,
            version = u.version, doc = u.doc, keys = u.keys, rev = u.rev + 1
        FROM unnest(o_ids, o_types, o_phases, o_updated, o_versions, o_docs, o_keys, o_revs)
            AS u(id, type, phase, updated_at, version, doc, keys, rev)
        WHERE t.id = u.id AND t.rev = u.rev;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written <> cardinality(o_ids) THEN
            RAISE EXCEPTION 'a task changed since this batch read it'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;
    IF cardinality(n_ids) > 0 THEN
        INSERT INTO tasks (id, type, phase, updated_at, version, doc, keys, rev)
        SELECT u.*, 1 FROM unnest(n_ids, n_types, n_phases, n_updated, n_versions, n_docs,
                                  n_keys) AS u
        ON CONFLICT (id) DO NOTHING;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written <> cardinality(n_ids) THEN
            RAISE EXCEPTION 'a task was created since this batch read it'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;
    UPDATE counters SET events = events + n_events, changes = changes + n_changes
        RETURNING events, changes INTO ev_top, ch_top;
    IF n_events > 0 THEN
        INSERT INTO events (seq, event_id, task_id, kind, format, source, received_at,
                            created_at, updated_at, raw, receipt)
        SELECT ev_top - n_events + u.n, u.event_id, u.task_id, u.kind, u.format, src,
               received, u.created_at, u.updated_at, u.raw, u.receipt
        FROM unnest(e_ids, e_tasks, e_kinds, e_formats, e_created, e_updated, e_raw,
                    e_receipts)
             WITH ORDINALITY AS u(event_id, task_id, kind, format, created_at, updated_at,
                                  raw, receipt, n);
    END IF;
    IF n_changes > 0 THEN
        INSERT INTO changes (seq, task_id, event_id, previous_phase, phase, changed_at,
                             recorded_at, task, kind, traceparent)
        SELECT ch_top - n_changes + u.n, u.task_id, u.event_id, u.previous_phase, u.phase,
               u.changed_at, received, u.task, u.kind, u.traceparent
        FROM unnest(c_tasks, c_events, c_previous, c_phases, c_at, c_docs, c_kinds,
                    c_traceparents)
             WITH ORDINALITY AS u(task_id, event_id, previous_phase, phase, changed_at,
                                  task, kind, traceparent, n);
        -- Wakes every replica's dispatcher at COMMIT.
        PERFORM pg_notify('phasewatch_changes', '');
    END IF;
    RETURN QUERY SELECT ev_top, ch_top;
END
$$;
"""

MIGRATIONS: list[Migration] = [
    Migration(1, "history, view, outbox, deliveries, leases", _INITIAL),
    Migration(2, "receipts in the history, traceparent in the outbox", _RECEIPTS),
    Migration(3, "stale alerts", _STALE_ALERTS),
    Migration(4, "optimistic ingest: a rev per view row, read and write functions", _OPTIMISTIC),
]
check_steps(MIGRATIONS)
