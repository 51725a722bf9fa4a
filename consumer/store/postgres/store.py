"""PostgreSQL :class:`~consumer.store.base.Store`: one database that any number of
phasewatch replicas share. With :mod:`~consumer.store.postgres.migrations`, the only code
that speaks PostgreSQL.

Driver: asyncpg (binary protocol; measured against psycopg 3 in
``bench/pg_driver_bench.py``, see the README). A pool of ``pool_size`` connections; each
write is one transaction on one of them, retried from scratch on a deadlock or a
serialization failure (both mean "nothing was written, try again").

**Many writers.** An ingest is optimistic, in two round trips, each its own implicit
transaction:

1. ``phasewatch_read`` reads the view rows of the batch's tasks, each with its ``rev``,
   and which of the batch's events are stored. No locks;
2. the batch is planned (:func:`~consumer.core.plan.plan_batch`, the one fold path);
3. ``phasewatch_write`` writes it: it row-locks the tasks of the batch's new events
   (``INSERT INTO task_ids ... ON CONFLICT DO UPDATE ... WHERE false`` over the ids in
   order: writers of a task take turns, and a fixed order cannot deadlock), updates each
   view row only where it is still at the rev read (and inserts the new ones only where
   still absent), then takes the seqs, ``UPDATE counters ... RETURNING``, and inserts the
   history and outbox rows. The counters row lock is held until the commit, so seqs
   become visible in commit order: a reader that saw seq *n* never later finds a lower
   one (the contract's rule; a sequence would break it, see
   ``tests/store/test_postgres.py``). Under it run only the inserts and the commit
   itself, with no round trip to this process in between.

If a row moved since the read (another replica folded the same task), the write raises
``serialization_failure`` and has written nothing. The batch is then read again with
``take_locks`` (the same task_ids locks, taken before the read, in a transaction), which
no other writer can move, and written with the same function. A stored event that a
concurrent writer stored too is caught by the history's unique index (retried the same
way). So a phase change is recorded exactly once: a second replica always folds against
the first one's committed view, where the change is already made.

**Durability** is the server's: ``synchronous_commit`` as configured (on by default), so a
2xx to a webhook sender follows a durable commit.

**Leases** compare the ``now_ms`` their callers pass, like every backend: replicas on
different hosts need clocks in step (NTP) well within the lease time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg
import orjson
from yarl import URL

from consumer.core.change import ChangeRecord, stale_kind
from consumer.core.codec import Event, EventFormat, decode
from consumer.core.fold import TaskState
from consumer.core.plan import BatchPlan, DedupKey, decode_keys, encode_keys, plan_batch
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
from consumer.store.postgres.flights import Flight, Flights, Row
from consumer.store.postgres.migrations import MIGRATIONS

__all__ = ["PostgresStore", "display_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Transient failures of a whole transaction: nothing was written, run it again. A unique
# violation is one too: two replicas storing the same untasked event (no task row to
# lock) at once; the retry finds it stored.
_RETRY = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.UniqueViolationError,
)
_TX_ATTEMPTS = 8


class _Stale(Exception):
    """A batch planned on top of one in flight that did not commit as planned."""


# The advisory lock key that migrations run under ("phasewatch" in ASCII, shortened).
_MIGRATION_LOCK = 0x7068617365


async def _keep_session(con: asyncpg.Connection) -> None:
    del con


def display_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parsed = URL(url)
    except ValueError:
        return "(an unparseable URL)"
    return str(parsed.with_password(None)) if parsed.password else url


def _number(value: float | None) -> int | float:
    """A stored time as the fold keeps it: integral values as ints (Unix ms)."""
    if value is None:
        raise ValueError("a time column held NULL")
    return int(value) if value.is_integer() else value


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        pool_size: int = 10,
        record_updates: bool = False,
        migrate: bool = True,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self.url = url
        self.record_updates = record_updates
        self.migrations_applied: list[Migration] = []
        self._password = password
        self._pool_size = pool_size
        self._migrate = migrate
        self._migrations = list(migrations)
        self._pool: asyncpg.Pool | None = None
        self._wakers: list[Callable[[], None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._flights = Flights()
        # Batches whose optimistic write found a task moved and went again under locks.
        self.optimistic_conflicts = 0
        # A test seam: awaited between an ingest's read and its write, to let another
        # writer move the batch's tasks in between.
        self.after_read: Callable[[], Awaitable[None]] | None = None

    @property
    def pipeline_depth(self) -> int:
        # Two batches in flight: while the server writes and fsyncs one, this process
        # decodes and folds the next (they are on different processes, often cores).
        # Their transactions commit in either order; seqs still follow commit order.
        return 2

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        where = f"PHASEWATCH_DATABASE_URL ({display_url(self.url)})"
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                password=self._password,
                min_size=1,
                max_size=self._pool_size,
                timeout=10,
                command_timeout=60,
                # Statements are few and fixed: keep them prepared per connection.
                statement_cache_size=100,
                # The default reset costs a round trip per checkout (RESET ALL, UNLISTEN
                # ...), about a fifth of a small batch's time. Nothing here leaves
                # session state behind: the migration lock is released explicitly and
                # LISTEN has its own connection outside the pool.
                reset=_keep_session,
                # Every statement planned with the statistics of the moment. After five
                # runs the server may switch a prepared statement to a generic plan, and
                # one made while the tables were nearly empty scans them whole as they
                # grow: the dispatcher's outbox and delivery reads got slower with every
                # second of bench/dispatch_latency.py (median 3 ms to 53 ms over 40 s,
                # p99 86 ms; with custom plans flat at 3-6 ms, p99 29 ms).
                server_settings={"plan_cache_mode": "force_custom_plan"},
            )
        except (OSError, TimeoutError) as exc:
            raise StoreOpenError(f"{where}: cannot connect: {_reason(exc)}") from exc
        except asyncpg.InvalidPasswordError as exc:
            raise StoreOpenError(
                f"{where}: the server refused the credentials (PHASEWATCH_DATABASE_PASSWORD"
                f" or the URL's password): {exc}"
            ) from exc
        except asyncpg.InvalidCatalogNameError as exc:
            raise StoreOpenError(f"{where}: {exc} (create it first)") from exc
        except asyncpg.PostgresError as exc:
            raise StoreOpenError(f"{where}: {exc}") from exc
        try:
            await self._ensure_schema(where)
        except BaseException:
            await self.close()
            raise

    async def _ensure_schema(self, where: str) -> None:
        async with self._p().acquire() as con:
            # A session lock, held across the steps' transactions: replicas starting
            # together wait here, then find the schema migrated.
            await con.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await con.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    " version integer NOT NULL, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                current = await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
                refusal = too_new(where, current, self._migrations)
                if refusal is not None:
                    raise StoreOpenError(refusal)
                steps = pending(self._migrations, current)
                if steps and not self._migrate:
                    raise StoreOpenError(
                        f"{where} is at schema {current}, this version needs"
                        f" {len(self._migrations)}: run `phasewatch migrate`"
                        " (PHASEWATCH_DATABASE_MIGRATE is false)"
                    )
                for step in steps:
                    async with con.transaction():
                        await con.execute(step.sql)
                        await con.execute(
                            "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                            step.version,
                            step.name,
                        )
                    log.info("database migrated to schema %d: %s", step.version, step.name)
                    self.migrations_applied.append(step)
            finally:
                await con.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open")
        return self._pool

    async def _write(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction, again from scratch after a transient conflict."""
        for attempt in range(1, _TX_ATTEMPTS + 1):
            try:
                async with self._p().acquire() as con, con.transaction():
                    return await fn(con)
            except _RETRY:
                if attempt == _TX_ATTEMPTS:
                    raise
                await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._p().acquire() as con:
            rows: list[asyncpg.Record] = await con.fetch(sql, *args)
            return rows

    # ------------------------------------------------------------ ingestion

    async def ingest(
        self,
        events: Sequence[Event],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
    ) -> IngestResult:
        batch = list(events)
        mine = sorted({e.task_id for e in batch if e.task_id is not None})
        flight, earlier = self._flights.start(mine)
        committed = False
        try:
            # Optimistic first: read without locks, write in one implicit transaction
            # (two round trips), on top of this process's batches still in flight
            # (consumer.store.postgres.flights). If a task moved in between, nothing was
            # written: read again under the row locks, in a transaction, where no
            # writer can move it.
            try:
                # Before taking a connection: the batches ahead need one to get planned.
                rows, known = await _rows_ahead(earlier)
                async with self._p().acquire() as con:
                    result = await self._ingest_on(
                        con,
                        batch,
                        source,
                        received_at,
                        record_changes=record_changes,
                        flight=flight,
                        ahead=set(earlier.values()),
                        rows=rows,
                        known=known,
                    )
                committed = True
                return result
            except (*_RETRY, _Stale):
                self.optimistic_conflicts += 1
            flight.finish(False)  # the batches planned on top of this one go again too
            return await self._write(
                lambda con: self._ingest_on(
                    con, batch, source, received_at, record_changes=record_changes, take_locks=True
                )
            )
        finally:
            flight.finish(committed)
            self._flights.end(flight, mine)

    async def ingest_raw(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
        keys: Sequence[bytes | None] | None = None,  # one transaction per call: unused
        receipts: Sequence[Receipt | None] | None = None,
    ) -> RawIngestResult:
        del keys
        return await ingest_decoded(
            self, raws, source, received_at, record_changes=record_changes, receipts=receipts
        )

    async def _ingest_on(
        self,
        con: asyncpg.Connection,
        events: list[Event],
        source: str,
        received_at: int,
        *,
        record_changes: bool,
        flight: Flight | None = None,
        ahead: set[Flight] | None = None,
        rows: dict[str, Row] | None = None,
        known: set[DedupKey] | None = None,
        take_locks: bool = False,
    ) -> IngestResult:
        # The rows to fold against: from the batches in flight ahead of this one where
        # they hold the task (``rows``, with the event keys they store, ``known``: the
        # caller's own, added to here), from the database for the rest.
        rows = {} if rows is None else rows
        known = set() if known is None else known
        tasked = [e for e in events if e.task_id is not None]
        for kind, task_id, event_id, doc, keys, version, rev in await con.fetch(
            _READ,
            take_locks,
            sorted({t for e in tasked if (t := e.task_id) is not None and t not in rows}),
            [e.task_id for e in tasked],
            [e.id for e in tasked],
            [e.id for e in events if e.task_id is None],
        ):
            if kind == 0:
                rows[task_id] = Row(TaskState(orjson.loads(doc), decode_keys(keys)), version, rev)
            else:
                known.add((task_id, event_id))
        if self.after_read is not None:
            await self.after_read()
        plan = plan_batch(
            events,
            known,
            {task_id: row.state for task_id, row in rows.items()},
            record_updates=self.record_updates,
            record_changes=record_changes,
        )
        created, updated, after = _view_columns(plan, rows)
        if flight is not None:
            flight.plan_made(after, {(e.task_id, e.id) for e in plan.new_events})
        if ahead:
            await asyncio.wait([f.written for f in ahead])
            if not all(f.written.result() for f in ahead):
                raise _Stale
        new, changes = plan.new_events, plan.changes
        base = 0
        if new or changes or plan.states:
            _, changes_top = await con.fetchrow(
                _WRITE,
                sorted({e.task_id for e in new if e.task_id is not None}),
                *created,
                *updated,
                len(new),
                len(changes),
                source,
                received_at,
                [e.id for e in new],
                [e.task_id for e in new],
                [e.kind for e in new],
                [e.format.value for e in new],
                [float(e.created_at) for e in new],
                [None if e.updated_at is None else float(e.updated_at) for e in new],
                [e.raw for e in new],
                [None if e.receipt is None else e.receipt.encode() for e in new],
                [c.task_id for c in changes],
                [c.event_id for c in changes],
                [c.previous_phase for c in changes],
                [c.phase for c in changes],
                [float(c.changed_at) for c in changes],
                [orjson.dumps(c.task) for c in changes],
                [c.kind for c in changes],
                [c.traceparent for c in changes],
            )
            base = changes_top - len(changes)
        recorded = [c.recorded(seq, received_at) for seq, c in enumerate(plan.changes, base + 1)]
        return IngestResult(plan.outcomes, recorded)

    # ------------------------------------------------------------ small writes

    async def set_cursor(self, handler: str, seq: int) -> None:
        await self._write(
            lambda con: con.execute(
                "INSERT INTO cursors (handler, seq) VALUES ($1, $2)"
                " ON CONFLICT (handler) DO UPDATE SET seq = excluded.seq",
                handler,
                seq,
            )
        )

    async def set_cursors(self, cursors: Mapping[str, int]) -> None:
        if not cursors:
            return
        names = sorted(cursors)
        await self._write(
            lambda con: con.execute(
                "INSERT INTO cursors (handler, seq)"
                " SELECT * FROM unnest($1::text[], $2::bigint[])"
                " ON CONFLICT (handler) DO UPDATE SET seq = excluded.seq",
                names,
                [cursors[n] for n in names],
            )
        )

    async def record_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        # One row per key: a batch may carry a failing record and the final one.
        latest = {(d.handler, d.seq, d.replay): d for d in deliveries}
        rows = list(latest.values())
        await self._write(
            lambda con: con.execute(
                "INSERT INTO deliveries (handler, seq, replay, status, attempts,"
                " first_attempt_at, last_attempt_at, error)"
                " SELECT * FROM unnest($1::text[], $2::bigint[], $3::boolean[], $4::text[],"
                " $5::integer[], $6::bigint[], $7::bigint[], $8::text[])"
                " ON CONFLICT (handler, seq, replay) DO UPDATE SET status = excluded.status,"
                " attempts = excluded.attempts, first_attempt_at = excluded.first_attempt_at,"
                " last_attempt_at = excluded.last_attempt_at, error = excluded.error",
                [d.handler for d in rows],
                [d.seq for d in rows],
                [d.replay for d in rows],
                [d.status.value for d in rows],
                [d.attempts for d in rows],
                [d.first_attempt_at for d in rows],
                [d.last_attempt_at for d in rows],
                [d.error for d in rows],
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
        result = await self._write(
            lambda con: con.execute(
                "UPDATE deliveries SET status = $1 WHERE status = $2"
                " AND ($3::text IS NULL OR handler = $3)"
                " AND ($4::bigint[] IS NULL OR seq = ANY($4))",
                to.value,
                frm.value,
                handler,
                None if seqs is None else list(seqs),
            )
        )
        return int(str(result).rsplit(" ", 1)[-1])

    async def acquire_lease(
        self, name: str, owner: str, ttl_ms: int, now_ms: int, *, take_from: str | None = None
    ) -> str:
        return (await self._take_leases([name], owner, ttl_ms, now_ms, take_from))[0]

    async def acquire_leases(
        self, names: Sequence[str], owner: str, ttl_ms: int, now_ms: int
    ) -> list[str]:
        return await self._take_leases(names, owner, ttl_ms, now_ms, None) if names else []

    async def _take_leases(
        self,
        names: Sequence[str],
        owner: str,
        ttl_ms: int,
        now_ms: int,
        take_from: str | None,
    ) -> list[str]:
        async def run(con: asyncpg.Connection) -> list[str]:
            # In name order: two processes renewing overlapping sets cannot deadlock.
            await con.execute(
                "INSERT INTO leases (name, owner, expires_at)"
                " SELECT n, $2, $3 FROM unnest($1::text[]) AS u(n) ORDER BY n"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at"
                " WHERE leases.owner = excluded.owner OR leases.owner = $4"
                " OR leases.expires_at < $5",
                sorted(set(names)),
                owner,
                now_ms + ttl_ms,
                take_from,
                now_ms,
            )
            rows = await con.fetch(
                "SELECT name, owner FROM leases WHERE name = ANY($1::text[])", list(names)
            )
            holders = {row[0]: row[1] for row in rows}
            return [str(holders[name]) for name in names]

        return await self._write(run)

    async def release_lease(self, name: str, owner: str) -> None:
        await self._write(
            lambda con: con.execute(
                "DELETE FROM leases WHERE name = $1 AND owner = $2", name, owner
            )
        )

    async def lease_holders(self, prefix: str, now_ms: int) -> dict[str, str]:
        rows = await self._fetch(
            "SELECT name, owner FROM leases WHERE starts_with(name, $1) AND expires_at >= $2",
            prefix,
            now_ms,
        )
        return {row[0]: row[1] for row in rows}

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM meta WHERE key = $1", key)
        return str(rows[0][0]) if rows else None

    async def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            await self._write(lambda con: con.execute("DELETE FROM meta WHERE key = $1", key))
        else:
            await self._write(
                lambda con: con.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    key,
                    value,
                )
            )

    # ------------------------------------------------------------ rebuild

    async def stage_rebuilt(self, states: Mapping[str, TaskState]) -> None:
        if not states:
            return
        columns = _rebuild_columns(states)
        await self._write(lambda con: con.execute(_STAGE, *columns))

    async def swap_rebuilt(self, upto_seq: int) -> int:
        async def run(con: asyncpg.Connection) -> int:
            # SHARE conflicts with the ROW EXCLUSIVE every ingest takes on task_ids first:
            # in-flight ingests finish, new ones wait until the swap commits. So the late
            # events read below are all there will be, and none is folded twice.
            await con.execute("LOCK TABLE task_ids IN SHARE MODE")
            late = [
                decode(bytes(row[0]))
                for row in await con.fetch(
                    "SELECT raw FROM events WHERE seq > $1 AND task_id IS NOT NULL ORDER BY seq",
                    upto_seq,
                )
            ]
            touched = sorted({e.task_id for e in late if e.task_id is not None})
            staged = {
                row[0]: TaskState(orjson.loads(row[1]), decode_keys(row[2]))
                for row in await con.fetch(
                    "SELECT id, doc, keys FROM tasks_rebuild WHERE id = ANY($1::text[])", touched
                )
            }
            plan = plan_batch(late, (), staged)
            if plan.states:
                await con.execute(_STAGE, *_rebuild_columns(plan.states))
            await con.execute(
                "DELETE FROM tasks AS t WHERE NOT EXISTS"
                " (SELECT 1 FROM tasks_rebuild AS r WHERE r.id = t.id)"
            )
            await con.execute(
                "INSERT INTO tasks (id, type, phase, updated_at, version, doc, keys)"
                " SELECT id, type, phase, updated_at, 0, doc, keys FROM tasks_rebuild"
                " ON CONFLICT (id) DO UPDATE SET type = excluded.type, phase = excluded.phase,"
                " updated_at = excluded.updated_at,"
                " version = tasks.version + (tasks.doc IS DISTINCT FROM excluded.doc)::int,"
                # A new rev: an ingest that read a row before the swap must read it again.
                " doc = excluded.doc, keys = excluded.keys, rev = tasks.rev + 1"
            )
            await con.execute("DELETE FROM tasks_rebuild")
            count: int = await con.fetchval("SELECT count(*) FROM tasks")
            return count

        return await self._write(run)

    async def discard_rebuilt(self) -> None:
        await self._write(lambda con: con.execute("DELETE FROM tasks_rebuild"))

    # ------------------------------------------------------------ stale alerts

    async def record_stale(
        self, phase: str, stale_for_ms: int, now_ms: int, limit: int = 500
    ) -> list[ChangeRecord]:
        kind = stale_kind(stale_for_ms)
        cutoff = float(now_ms - stale_for_ms)
        replayed = list(REPLAYED_SOURCES)

        async def run(con: asyncpg.Connection) -> list[ChangeRecord]:
            found = await con.fetch(_STALE_DUE, phase, cutoff, stale_for_ms, replayed, limit)
            if not found:
                return []
            # Lock the tasks as an ingest does (task_ids rows, in id order), then read the
            # view again: an ingest that held a lock first has committed, and what it
            # moved on (or another sweeper alerted) drops out.
            await con.execute(
                "SELECT 1 FROM task_ids WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                [row[0] for row in found],
            )
            due = await con.fetch(
                _STALE_DUE_AMONG, phase, cutoff, stale_for_ms, replayed, [row[0] for row in found]
            )
            if not due:
                return []
            ids = [row[0] for row in due]
            times = [row[1] for row in due]
            events = [decode_keys(row[3])["status"][2] for row in due]
            await con.execute(
                "DELETE FROM stale_alerts AS a USING unnest($1::text[], $2::float8[])"
                " AS u(id, at) WHERE a.task_id = u.id AND a.phase = $3"
                " AND a.stale_for_ms = $4 AND a.updated_at < u.at",
                ids,
                times,
                phase,
                stale_for_ms,
            )
            # Last: the seqs (the counters row lock, held until COMMIT), as an ingest.
            top: int = await con.fetchval(
                _WRITE_STALE,
                len(due),
                phase,
                stale_for_ms,
                ids,
                times,
                events,
                [row[2] for row in due],
                now_ms,
                kind,
            )
            base = top - len(due)
            return [
                ChangeRecord(
                    base + n,
                    row[0],
                    event_id,
                    phase,
                    phase,
                    _number(row[1]),
                    now_ms,
                    orjson.loads(row[2]),
                    kind,
                )
                for n, (row, event_id) in enumerate(zip(due, events, strict=True), 1)
            ]

        return await self._write(run)

    async def count_stale(self, phase: str, stale_for_ms: int, now_ms: int) -> int:
        rows = await self._fetch(
            "SELECT count(*) FROM tasks WHERE phase = $1 AND updated_at <= $2",
            phase,
            float(now_ms - stale_for_ms),
        )
        return int(rows[0][0])

    # ------------------------------------------------------------ change wake-ups

    async def listen_changes(self, wake: Callable[[], None]) -> None:
        """LISTEN on ``phasewatch_changes``, which every ingest that records changes
        notifies at COMMIT, on a connection of its own (outside the pool), reconnecting
        when it drops. After each (re)connect every waker is called once: changes may
        have committed while it was away."""
        self._wakers.append(wake)
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="pg-listen")

    def _wake(self, *_: object) -> None:
        for wake in self._wakers:
            wake()

    async def _listen(self) -> None:
        while True:
            try:
                con = await asyncpg.connect(self.url, password=self._password, timeout=10)
            except (OSError, TimeoutError, asyncpg.PostgresError):
                await asyncio.sleep(1.0)  # the database is away: the dispatcher polls
                continue
            lost = asyncio.Event()
            con.add_termination_listener(lambda _con, lost=lost: lost.set())
            try:
                await con.add_listener(_CHANNEL, self._wake)
                self._wake()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(30):
                            await lost.wait()
                    if not lost.is_set():
                        await con.execute("SELECT 1")  # a half-open connection fails here
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(con.close(), 5)
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------ reads

    async def get_task(self, task_id: str) -> StoredTask | None:
        rows = await self._fetch("SELECT doc, version FROM tasks WHERE id = $1", task_id)
        return StoredTask(orjson.loads(rows[0][0]), rows[0][1]) if rows else None

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        where: list[str] = []
        params: list[Any] = []

        def bind(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if query.phases:
            where.append(f"phase = ANY({bind(list(query.phases))}::text[])")
        if query.types:
            where.append(f"type = ANY({bind(list(query.types))}::text[])")
        if query.updated_since is not None:
            where.append(f"updated_at >= {bind(float(query.updated_since))}")
        if query.after is not None:
            op = "<" if query.descending else ">"
            at = bind(float(query.after.updated_at))
            where.append(f"(updated_at, id) {op} ({at}, {bind(query.after.task_id)})")
        order = "DESC" if query.descending else "ASC"
        # Only fixed fragments and $n placeholders are interpolated; values are bound.
        sql = (
            "SELECT doc, version, updated_at, id FROM tasks"  # noqa: S608
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY updated_at {order}, id {order} LIMIT {bind(query.limit + 1)}"
        )
        rows = await self._fetch(sql, *params)
        page = rows[: query.limit]
        tasks = [StoredTask(orjson.loads(row[0]), row[1]) for row in page]
        more = len(rows) > query.limit
        cursor = Cursor(_number(page[-1][2]), page[-1][3]) if more and page else None
        return TaskPage(tasks, cursor)

    async def task_history(self, task_id: str) -> list[HistoryEntry]:
        rows = await self._fetch(f"{_EVENT_COLUMNS} WHERE task_id = $1 ORDER BY seq", task_id)
        return [_entry(row) for row in rows]

    async def history_after(
        self, seq: int, limit: int = 1000, *, task_id: str | None = None
    ) -> list[HistoryEntry]:
        if task_id is None:
            rows = await self._fetch(
                f"{_EVENT_COLUMNS} WHERE seq > $1 ORDER BY seq LIMIT $2", seq, limit
            )
        else:
            rows = await self._fetch(
                f"{_EVENT_COLUMNS} WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                task_id,
                seq,
                limit,
            )
        return [_entry(row) for row in rows]

    async def task_ids_after(self, after: str | None, limit: int = 500) -> list[str]:
        # The column is COLLATE "C" (schema step 4): the byte order Python's sort and
        # SQLite's use, whatever the database's collation, served by the primary key.
        rows = await self._fetch(
            "SELECT id FROM task_ids WHERE id > $1 ORDER BY id LIMIT $2",
            after or "",
            limit,
        )
        return [row[0] for row in rows]

    async def history_of_tasks(self, task_ids: Sequence[str], upto_seq: int) -> list[HistoryEntry]:
        rows = await self._fetch(
            f"{_EVENT_COLUMNS} WHERE task_id = ANY($1::text[]) AND seq <= $2",
            list(task_ids),
            upto_seq,
        )
        entries = [_entry(row) for row in rows]
        entries.sort(key=lambda e: (e.task_id or "", e.seq))
        return entries

    async def task_changes(self, task_id: str) -> list[ChangeRecord]:
        rows = await self._fetch(f"{_CHANGE_COLUMNS} WHERE task_id = $1 ORDER BY seq", task_id)
        return [_change(row) for row in rows]

    async def changes_after(self, seq: int, limit: int = 500) -> list[ChangeRecord]:
        rows = await self._fetch(
            f"{_CHANGE_COLUMNS} WHERE seq > $1 ORDER BY seq LIMIT $2", seq, limit
        )
        return [_change(row) for row in rows]

    async def changes_by_seq(self, seqs: Sequence[int]) -> list[ChangeRecord]:
        rows = await self._fetch(
            f"{_CHANGE_COLUMNS} WHERE seq = ANY($1::bigint[]) ORDER BY seq", list(seqs)
        )
        return [_change(row) for row in rows]

    async def oldest_change_seq(self) -> int:
        rows = await self._fetch("SELECT value FROM meta WHERE key = $1", _PRUNED_UPTO)
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

        async def run(con: asyncpg.Connection) -> int:
            last: int = await con.fetchval("SELECT changes FROM counters")
            cursors = await con.fetch("SELECT handler, seq FROM cursors")
            seqs = [
                row[1]
                for row in cursors
                if needed_by is None
                or any(row[0] == h or row[0].startswith(f"{h}@") for h in needed_by)
            ]
            upto = min(seqs, default=last)
            if keep_last is not None:
                upto = min(upto, last - keep_last)
            gone: int | None = await con.fetchval(
                "WITH gone AS (DELETE FROM changes WHERE seq <= $1"
                " AND ($2::bigint IS NULL OR recorded_at < $2)"
                " AND seq NOT IN (SELECT seq FROM deliveries"
                " WHERE status IN ('failing', 'dead', 'redrive')) RETURNING seq),"
                " top AS (SELECT count(*) AS n, max(seq) AS upto FROM gone),"
                " note AS (INSERT INTO meta (key, value) SELECT $3, upto::text FROM top"
                " WHERE upto IS NOT NULL ON CONFLICT (key) DO UPDATE SET value ="
                " greatest(meta.value::bigint, excluded.value::bigint)::text)"
                " SELECT n FROM top",
                upto,
                before_ms,
                _PRUNED_UPTO,
            )
            return gone or 0

        return await self._write(run)

    async def get_cursor(self, handler: str) -> int | None:
        rows = await self._fetch("SELECT seq FROM cursors WHERE handler = $1", handler)
        return int(rows[0][0]) if rows else None

    async def deliveries_for(
        self, handler: str, seqs: Sequence[int], *, replay: bool = False
    ) -> dict[int, Delivery]:
        rows = await self._fetch(
            f"{_DELIVERY_COLUMNS} WHERE handler = $1 AND replay = $2 AND seq = ANY($3::bigint[])",
            handler,
            replay,
            list(seqs),
        )
        return {d.seq: d for d in map(_delivery, rows)}

    async def list_deliveries(
        self, statuses: Sequence[DeliveryStatus], handler: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        rows = await self._fetch(
            f"{_DELIVERY_COLUMNS} WHERE status = ANY($1::text[])"
            " AND ($2::text IS NULL OR handler = $2) ORDER BY seq, handler LIMIT $3",
            [s.value for s in statuses],
            handler,
            limit,
        )
        return [_delivery(row) for row in rows]

    async def stats(self) -> StoreStats:
        # The history's count is its counter (append-only, and its seqs have no gaps: a
        # rolled-back allocation rolls back with its transaction). Tasks and changes are
        # counted: `rebuild --check` relies on the view's real row count, and retention
        # prunes the outbox.
        rows = await self._fetch(
            "SELECT events, changes, (SELECT count(*) FROM tasks),"
            " (SELECT count(*) FROM changes) FROM counters"
        )
        events, last_change, tasks, changes = rows[0]
        return StoreStats(events, tasks, changes, last_change, events)


async def _rows_ahead(earlier: Mapping[str, Flight]) -> tuple[dict[str, Row], set[DedupKey]]:
    """The rows a batch takes from the flights ahead of it (``earlier``: per task, the
    latest), once they are planned, and the event keys those will have stored."""
    rows: dict[str, Row] = {}
    known: set[DedupKey] = set()
    ahead = set(earlier.values())
    if not ahead:
        return rows, known
    await asyncio.wait([f.planned for f in ahead])
    for task_id, before in earlier.items():
        row = before.view.get(task_id)
        if row is not None:
            rows[task_id] = row
    for before in ahead:
        known |= before.new_keys
    return rows, known


def _view_columns(
    plan: BatchPlan, rows: Mapping[str, Row]
) -> tuple[list[list[Any]], list[list[Any]], dict[str, Row]]:
    """A plan's view rows as the write's columns, in two sets: created (read as absent)
    and updated (with the rev they were read at, which the write checks); and every row
    of the batch as the write will leave it, for the batches planned on top of it."""
    created: list[list[Any]] = [[] for _ in range(7)]
    updated: list[list[Any]] = [[] for _ in range(8)]
    after = dict(rows)
    for task_id, state in plan.states.items():
        task_type = state.task.get("type")
        row = rows.get(task_id)
        version = (0 if row is None else row.version) + (task_id in plan.versions_bumped)
        values = (
            task_id,
            task_type if isinstance(task_type, str) else None,
            state.phase,
            float(state.updated_at),
            version,
            orjson.dumps(state.task),
            encode_keys(state.keys),
        )
        if row is None:
            for column, value in zip(created, values, strict=True):
                column.append(value)
        else:
            for column, value in zip(updated, (*values, row.rev), strict=True):
                column.append(value)
        after[task_id] = Row(state, version, 1 if row is None else row.rev + 1)
    return created, updated, after


def _rebuild_columns(states: Mapping[str, TaskState]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(6)]
    for task_id, state in states.items():
        task_type = state.task.get("type")
        for column, value in zip(
            columns,
            (
                task_id,
                task_type if isinstance(task_type, str) else None,
                state.phase,
                float(state.updated_at),
                orjson.dumps(state.task),
                encode_keys(state.keys),
            ),
            strict=True,
        ):
            column.append(value)
    return columns


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


_CHANNEL = "phasewatch_changes"
_PRUNED_UPTO = "phasewatch:changes_pruned_upto"
_READ = "SELECT * FROM phasewatch_read($1, $2, $3, $4, $5)"
_WRITE = (
    "SELECT * FROM phasewatch_write($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
    " $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30,"
    " $31, $32, $33, $34, $35, $36)"
)
# The tasks due a stale alert (see StaleStore.record_stale), oldest first: in the phase
# since the cutoff or before (tasks_by_phase), not alerted for this updatedAt and
# threshold, and watched: the task's last recorded phase change led here, or a live
# event (a source not in $4) carried the current updatedAt. $1 phase, $2 cutoff, $3 the
# threshold (ms), $4 the replayed sources, $5 the limit or the ids to look among.
_STALE_WHERE = """
    t.phase = $1 AND t.updated_at <= $2
    AND NOT EXISTS (SELECT 1 FROM stale_alerts AS a WHERE a.task_id = t.id
        AND a.phase = $1 AND a.updated_at = t.updated_at AND a.stale_for_ms = $3)
    AND ((SELECT c.phase FROM changes AS c WHERE c.task_id = t.id AND c.kind = 'phase'
          ORDER BY c.seq DESC LIMIT 1) = $1
         OR EXISTS (SELECT 1 FROM events AS e WHERE e.task_id = t.id
             AND e.updated_at = t.updated_at AND e.source <> ALL($4::text[])))
"""
_STALE_DUE = (
    "SELECT t.id FROM tasks AS t WHERE"  # noqa: S608 - constants only
    + _STALE_WHERE
    + "ORDER BY t.updated_at, t.id LIMIT $5"
)
_STALE_DUE_AMONG = (
    "SELECT t.id, t.updated_at, t.doc, t.keys FROM tasks AS t WHERE"  # noqa: S608
    + _STALE_WHERE
    + "AND t.id = ANY($5::text[]) ORDER BY t.updated_at, t.id"
)
# $1 how many; $2 phase; $3 threshold; $4-$7 task ids, updatedAts, event ids, tasks;
# $8 the sweep's time; $9 the kind.
_WRITE_STALE = """
WITH alloc AS (
    UPDATE counters SET changes = changes + $1 RETURNING changes
), alerts AS (
    INSERT INTO stale_alerts (task_id, phase, updated_at, stale_for_ms, seq)
    SELECT u.task_id, $2, u.updated_at, $3, alloc.changes - $1 + u.n
    FROM alloc, unnest($4::text[], $5::float8[]) WITH ORDINALITY AS u(task_id, updated_at, n)
), ch AS (
    INSERT INTO changes (seq, task_id, event_id, previous_phase, phase, changed_at,
                         recorded_at, task, kind)
    SELECT alloc.changes - $1 + u.n, u.task_id, u.event_id, $2, $2, u.updated_at, $8,
           u.task, $9
    FROM alloc, unnest($4::text[], $6::text[], $5::float8[], $7::bytea[])
         WITH ORDINALITY AS u(task_id, event_id, updated_at, task, n)
)
SELECT changes, pg_notify('phasewatch_changes', '') FROM alloc
"""
_STAGE = (
    "INSERT INTO tasks_rebuild (id, type, phase, updated_at, doc, keys)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::bytea[],"
    " $6::bytea[])"
    " ON CONFLICT (id) DO UPDATE SET type = excluded.type, phase = excluded.phase,"
    " updated_at = excluded.updated_at, doc = excluded.doc, keys = excluded.keys"
)
_EVENT_COLUMNS = (
    "SELECT seq, event_id, kind, format, source, received_at, created_at, task_id, raw,"
    " receipt FROM events"
)
_CHANGE_COLUMNS = (
    "SELECT seq, task_id, event_id, previous_phase, phase, changed_at, recorded_at, task, kind,"
    " traceparent FROM changes"
)
_DELIVERY_COLUMNS = (
    "SELECT handler, seq, status, attempts, first_attempt_at, last_attempt_at, error, replay"
    " FROM deliveries"
)


def _entry(row: asyncpg.Record) -> HistoryEntry:
    seq, event_id, kind, fmt, source, received_at, created_at, task_id, raw, receipt = row
    return HistoryEntry(
        seq,
        event_id,
        kind,
        EventFormat(fmt),
        source,
        received_at,
        _number(created_at),
        task_id,
        bytes(raw),
        Receipt.decode(receipt),
    )


def _change(row: asyncpg.Record) -> ChangeRecord:
    seq, task_id, event_id, previous, phase, changed_at, recorded_at, task, kind, trace = row
    return ChangeRecord(
        seq,
        task_id,
        event_id,
        previous,
        phase,
        _number(changed_at),
        recorded_at,
        orjson.loads(task),
        kind,
        trace,
    )


def _delivery(row: asyncpg.Record) -> Delivery:
    handler, seq, status, attempts, first, last, error, replay = row
    return Delivery(handler, seq, DeliveryStatus(status), attempts, first, last, error, replay)
