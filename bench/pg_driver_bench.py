"""Which PostgreSQL driver for phasewatch: asyncpg vs psycopg 3 (async), by measurement.

What it measures: phasewatch's ingest transaction on a real PostgreSQL (fsync on), one
transaction per batch of B events over max(1, B/4) distinct tasks (half of them already
known, half new; 36-char random ids; ~1.2 KB JSON raw bodies, ~800-byte task docs):

1. lock the tasks (``INSERT INTO task_ids ... ORDER BY 1 ON CONFLICT ... WHERE false``);
2. read their view rows; 3. read the batch's already-known events;
4. upsert the tasks (all columns); 5. allocate seqs from the one ``counters`` row;
6. insert B events and one change per task with those seqs; 7. COMMIT.

For each driver every way it offers to write many rows (steps 4 and 6) is tried:

* asyncpg: ``executemany``; one ``unnest($1::text[], ...)`` statement per table;
  ``copy_records_to_table`` (binary COPY) for events/changes (the upsert stays unnest).
* psycopg (``AsyncConnection``): ``executemany`` (pipelined by psycopg); unnest arrays;
  ``cursor.copy()`` in text and in binary format; each also with an explicit
  ``conn.pipeline()`` around BEGIN + steps 1-5 (1-3 in one round trip, 4-5 in another;
  for the non-COPY methods step 6 and COMMIT ride the pipeline too). psycopg sends binary
  parameters (``%b``) and asks for binary results, as asyncpg always does: text-format
  arrays cost psycopg several times the client CPU (``--no-psycopg-binary`` to see).

Sizes: B=256 on one connection (a Kafka partition's batches); B=16 and B=1 on 4 concurrent
connections, each committing its own transactions (webhooks arrive concurrently). Stage 1
screens every method (short alternating rounds) and keeps each driver's best per size;
stage 2 runs those two alternately (order swapped every round) for ``--rounds`` rounds of
equal work (~``--seconds`` each). Reported: median events/s, median client CPU per event
(``time.process_time`` of this process, which holds no server work: the service shares 2
cores with the database), and the asyncpg/psycopg ratio of the medians (and the median of
the per-round ratios, which drifting load from neighbours disturbs less). Each contender
writes to its own pre-seeded, analysed database; a CHECKPOINT precedes every round; the
loop is uvloop, as the service's (``--no-uvloop`` for asyncio's own).

    .venv/bin/python bench/pg_driver_bench.py [--sizes 256,16,1] [--rounds 5] [--seconds 3]
        [--screen-rounds 3] [--screen-seconds 1.5] [--url postgresql://...]

Without ``--url`` it starts its own server with ``deploy/postgres_local.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

REPO = Path(__file__).resolve().parent.parent

SCHEMA = """
CREATE TABLE task_ids (id text PRIMARY KEY);
CREATE TABLE tasks (id text PRIMARY KEY, type text, phase text NOT NULL,
  updated_at double precision NOT NULL, version bigint NOT NULL, doc bytea NOT NULL,
  keys bytea NOT NULL);
CREATE TABLE events (seq bigint PRIMARY KEY, event_id text NOT NULL, task_id text,
  kind text NOT NULL, format text NOT NULL, source text NOT NULL, received_at bigint NOT NULL,
  created_at double precision NOT NULL, updated_at double precision, raw bytea NOT NULL);
CREATE UNIQUE INDEX ON events (task_id, event_id);
CREATE TABLE changes (seq bigint PRIMARY KEY, task_id text NOT NULL, event_id text NOT NULL,
  previous_phase text, phase text NOT NULL, changed_at double precision NOT NULL,
  recorded_at bigint NOT NULL, task bytea NOT NULL, kind text NOT NULL);
CREATE TABLE counters (one boolean PRIMARY KEY DEFAULT true, events bigint NOT NULL,
  changes bigint NOT NULL);
INSERT INTO counters VALUES (true, 0, 0);
"""

EVENT_COLS = ("seq", "event_id", "task_id", "kind", "format", "source", "received_at",
              "created_at", "updated_at", "raw")
EVENT_TYPES = ("int8", "text", "text", "text", "text", "text", "int8", "float8", "float8",
               "bytea")
CHANGE_COLS = ("seq", "task_id", "event_id", "previous_phase", "phase", "changed_at",
               "recorded_at", "task", "kind")
CHANGE_TYPES = ("int8", "text", "text", "text", "text", "float8", "int8", "bytea", "text")
TASK_TYPES = ("text", "text", "text", "float8", "int8", "bytea", "bytea")

LOCK_SQL = ("INSERT INTO task_ids (id) SELECT unnest($1::text[]) ORDER BY 1"
            " ON CONFLICT (id) DO UPDATE SET id = excluded.id WHERE false")
READ_SQL = "SELECT id, doc, keys, version FROM tasks WHERE id = ANY($1::text[])"
KNOWN_SQL = ("SELECT task_id, event_id FROM events WHERE (task_id, event_id) IN"
             " (SELECT * FROM unnest($1::text[], $2::text[]))")
_UPSERT_TAIL = (" ON CONFLICT (id) DO UPDATE SET type = excluded.type, phase = excluded.phase,"
                " updated_at = excluded.updated_at, version = excluded.version,"
                " doc = excluded.doc, keys = excluded.keys")
UPSERT_ROW_SQL = ("INSERT INTO tasks (id, type, phase, updated_at, version, doc, keys)"
                  " VALUES ($1, $2, $3, $4, $5, $6, $7)" + _UPSERT_TAIL)
UPSERT_UNNEST_SQL = ("INSERT INTO tasks (id, type, phase, updated_at, version, doc, keys)"
                     " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[],"
                     " $5::int8[], $6::bytea[], $7::bytea[])" + _UPSERT_TAIL)
ALLOC_SQL = ("UPDATE counters SET events = events + $1, changes = changes + $2"
             " RETURNING events, changes")


def _insert_sql(table: str, cols: tuple[str, ...], types: tuple[str, ...]) -> tuple[str, str]:
    names = ", ".join(cols)
    values = ", ".join(f"${i + 1}" for i in range(len(cols)))
    row = f"INSERT INTO {table} ({names}) VALUES ({values})"
    arrays = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
    return row, f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})"


EVENT_ROW_SQL, EVENT_UNNEST_SQL = _insert_sql("events", EVENT_COLS, EVENT_TYPES)
CHANGE_ROW_SQL, CHANGE_UNNEST_SQL = _insert_sql("changes", CHANGE_COLS, CHANGE_TYPES)


def pg(sql: str, binary: bool) -> str:
    """The same statement with psycopg's placeholders (each ``$n`` is used once, in order):
    ``%b`` sends the parameter in binary format (arrays of text/bytea: several times less
    client CPU than ``%s``'s text-format array literals), ``%s`` lets psycopg choose."""
    return re.sub(r"\$\d+", "%b" if binary else "%s", sql)


PHASES = ("pending", "queued", "running", "succeeded", "failed")
KINDS = ("task.created", "task.updated", "task.progress", "task.completed")
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def random_id(rng: random.Random) -> str:
    return "".join(rng.choices(ID_ALPHABET, k=36))


def make_raw(rng: random.Random) -> bytes:
    """About 1.2 KB of JSON: a webhook body."""
    body = {
        "id": random_id(rng), "type": rng.choice(KINDS), "created_at": time.time(),
        "data": {"task_id": random_id(rng), "status": rng.choice(PHASES),
                 "attempt": rng.randint(1, 5),
                 "labels": {f"k{i}": random_id(rng) for i in range(8)},
                 "note": "x" * 600},
    }
    raw = json.dumps(body).encode()
    return raw + b" " * max(0, 1200 - len(raw))


def make_doc(rng: random.Random) -> bytes:
    """About 800 bytes: a folded task document."""
    doc = {"phase": rng.choice(PHASES), "history": [random_id(rng) for _ in range(14)],
           "fields": {f"f{i}": rng.random() for i in range(6)}}
    raw = json.dumps(doc).encode()
    return raw + b" " * max(0, 800 - len(raw))


@dataclass
class Pools:
    """Shared payload pools: bodies and docs are reused (rows stay below the TOAST
    threshold, so reuse changes nothing on the server); every id is fresh."""

    raws: list[bytes]
    docs: list[bytes]
    keys: list[bytes]

    @classmethod
    def make(cls, rng: random.Random) -> Pools:
        return cls([make_raw(rng) for _ in range(512)], [make_doc(rng) for _ in range(256)],
                   [json.dumps([random_id(rng), random_id(rng)]).encode() for _ in range(64)])


@dataclass
class Batch:
    task_ids: list[str]                       # distinct, in arrival order
    events: list[tuple[Any, ...]]             # EVENT_COLS minus seq
    event_task_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)


def make_batches(rng: random.Random, pools: Pools, known: list[str], size: int,
                 count: int) -> list[Batch]:
    """``count`` batches of ``size`` events over max(1, size/4) tasks, half already known
    (picked from ``known``, which the new ones join)."""
    n_tasks = max(1, size // 4)
    out: list[Batch] = []
    now = time.time()
    for i in range(count):
        ids: list[str] = []
        for j in range(n_tasks):
            use_known = (j % 2 == 0) if n_tasks > 1 else (i % 2 == 0)
            ids.append(rng.choice(known) if use_known and known else random_id(rng))
        ids = list(dict.fromkeys(ids))
        known.extend(ids)
        events = []
        for k in range(size):
            task = ids[k % len(ids)]
            created = now + i * 0.001 + k * 1e-6
            events.append((random_id(rng), task, rng.choice(KINDS), "json", "webhook",
                           time.time_ns(), created, created if k % 3 else None,
                           rng.choice(pools.raws)))
        out.append(Batch(ids, events, [e[1] for e in events], [e[0] for e in events]))
    return out


@dataclass
class Folded:
    tasks: list[tuple[Any, ...]]               # tasks columns
    changes: list[tuple[Any, ...]]             # CHANGE_COLS minus seq
    events: list[tuple[Any, ...]]              # events not yet known


def fold(batch: Batch, versions: dict[str, int], known: set[tuple[str, str]],
         pools: Pools) -> Folded:
    """The service's decode + fold, reduced to a constant cheap stand-in (same for both)."""
    events = [e for e in batch.events if (e[1], e[0]) not in known] if known else batch.events
    last: dict[str, tuple[Any, ...]] = {}
    for e in events:
        last[e[1]] = e
    now = time.time()
    tasks, changes = [], []
    for n, (task_id, e) in enumerate(last.items()):
        version = versions.get(task_id, 0) + 1
        doc = pools.docs[(version + n) % len(pools.docs)]
        phase = PHASES[version % len(PHASES)]
        previous = PHASES[(version - 1) % len(PHASES)] if version > 1 else None
        tasks.append((task_id, "build", phase, now, version, doc, pools.keys[n % len(pools.keys)]))
        changes.append((task_id, e[0], previous, phase, e[6], e[5], doc, e[2]))
    return Folded(tasks, changes, events)


def columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(c) for c in zip(*rows, strict=True)]


# ---------------------------------------------------------------------------- asyncpg

async def asyncpg_connect(url: str) -> Any:
    return await asyncpg.connect(url)


def asyncpg_txn(method: str, pools: Pools) -> Callable[[Any, Batch], Awaitable[int]]:
    async def txn(con: Any, batch: Batch) -> int:
        async with con.transaction():
            await con.execute(LOCK_SQL, batch.task_ids)
            rows = await con.fetch(READ_SQL, batch.task_ids)
            dups = await con.fetch(KNOWN_SQL, batch.event_task_ids, batch.event_ids)
            f = fold(batch, {r[0]: r[3] for r in rows}, {(r[0], r[1]) for r in dups}, pools)
            if method == "executemany":
                await con.executemany(UPSERT_ROW_SQL, f.tasks)
            else:
                await con.execute(UPSERT_UNNEST_SQL, *columns(f.tasks))
            ev_end, ch_end = await con.fetchrow(ALLOC_SQL, len(f.events), len(f.changes))
            ev0, ch0 = ev_end - len(f.events) + 1, ch_end - len(f.changes) + 1
            events = [(ev0 + i, *e) for i, e in enumerate(f.events)]
            changes = [(ch0 + i, *c) for i, c in enumerate(f.changes)]
            if method == "executemany":
                await con.executemany(EVENT_ROW_SQL, events)
                await con.executemany(CHANGE_ROW_SQL, changes)
            elif method == "unnest":
                await con.execute(EVENT_UNNEST_SQL, *columns(events))
                await con.execute(CHANGE_UNNEST_SQL, *columns(changes))
            else:
                await con.copy_records_to_table("events", records=events, columns=EVENT_COLS)
                await con.copy_records_to_table("changes", records=changes, columns=CHANGE_COLS)
        return len(f.events)

    return txn


# ---------------------------------------------------------------------------- psycopg

async def psycopg_connect(url: str) -> Any:
    # autocommit: BEGIN/COMMIT are sent explicitly, so a pipeline can carry them.
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


@dataclass(frozen=True)
class PgSql:
    """The statements in psycopg's spelling, binary or text parameters."""

    lock: str
    read: str
    known: str
    upsert_row: str
    upsert_unnest: str
    alloc: str
    event_row: str
    event_unnest: str
    change_row: str
    change_unnest: str

    @classmethod
    def make(cls, binary: bool) -> PgSql:
        return cls(*(pg(q, binary) for q in (
            LOCK_SQL, READ_SQL, KNOWN_SQL, UPSERT_ROW_SQL, UPSERT_UNNEST_SQL, ALLOC_SQL,
            EVENT_ROW_SQL, EVENT_UNNEST_SQL, CHANGE_ROW_SQL, CHANGE_UNNEST_SQL)))

COPY_EVENTS = f"COPY events ({', '.join(EVENT_COLS)}) FROM STDIN"
COPY_CHANGES = f"COPY changes ({', '.join(CHANGE_COLS)}) FROM STDIN"


async def _psycopg_write_rows(conn: Any, q: PgSql, method: str, events: list[tuple[Any, ...]],
                              changes: list[tuple[Any, ...]]) -> None:
    cur = conn.cursor()
    if method == "executemany":
        await cur.executemany(q.event_row, events)
        await cur.executemany(q.change_row, changes)
    elif method == "unnest":
        await cur.execute(q.event_unnest, columns(events))
        await cur.execute(q.change_unnest, columns(changes))
    else:
        binary = method == "copy-binary"
        for sql, rows, types in ((COPY_EVENTS, events, EVENT_TYPES),
                                 (COPY_CHANGES, changes, CHANGE_TYPES)):
            async with cur.copy(sql + (" (FORMAT BINARY)" if binary else "")) as copy:
                if binary:
                    copy.set_types(list(types))
                for row in rows:
                    await copy.write_row(row)


def psycopg_txn(method: str, pipeline: bool, binary: bool,
                pools: Pools) -> Callable[[Any, Batch], Awaitable[int]]:
    q = PgSql.make(binary)
    copying = method.startswith("copy")

    async def upsert(conn: Any, f: Folded) -> Any:
        if method == "executemany":
            await conn.cursor().executemany(q.upsert_row, f.tasks)
        else:
            await conn.execute(q.upsert_unnest, columns(f.tasks))
        return await conn.execute(q.alloc, (len(f.events), len(f.changes)))

    def with_seqs(f: Folded, ev_end: int, ch_end: int) -> tuple[list[Any], list[Any]]:
        ev0, ch0 = ev_end - len(f.events) + 1, ch_end - len(f.changes) + 1
        return ([(ev0 + i, *e) for i, e in enumerate(f.events)],
                [(ch0 + i, *c) for i, c in enumerate(f.changes)])

    async def reads(conn: Any, batch: Batch) -> tuple[Any, Any]:
        await conn.execute(q.lock, (batch.task_ids,))
        c_read = await conn.cursor(binary=binary).execute(q.read, (batch.task_ids,))
        c_known = await conn.cursor(binary=binary).execute(
            q.known, (batch.event_task_ids, batch.event_ids))
        return c_read, c_known

    async def plain(conn: Any, batch: Batch) -> int:
        await conn.execute("BEGIN")
        try:
            c_read, c_known = await reads(conn, batch)
            rows, dups = await c_read.fetchall(), await c_known.fetchall()
            f = fold(batch, {r[0]: r[3] for r in rows}, {(r[0], r[1]) for r in dups}, pools)
            ev_end, ch_end = await (await upsert(conn, f)).fetchone()
            await _psycopg_write_rows(conn, q, method, *with_seqs(f, ev_end, ch_end))
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        return len(f.events)

    async def piped(conn: Any, batch: Batch) -> int:
        try:
            async with conn.pipeline():
                await conn.execute("BEGIN")
                c_read, c_known = await reads(conn, batch)
                rows, dups = await c_read.fetchall(), await c_known.fetchall()   # 1 round trip
                f = fold(batch, {r[0]: r[3] for r in rows}, {(r[0], r[1]) for r in dups}, pools)
                ev_end, ch_end = await (await upsert(conn, f)).fetchone()       # 1 round trip
                events, changes = with_seqs(f, ev_end, ch_end)
                if not copying:
                    await _psycopg_write_rows(conn, q, method, events, changes)
                    await conn.execute("COMMIT")                                # 1 round trip
            if copying:   # COPY cannot run in pipeline mode
                await _psycopg_write_rows(conn, q, method, events, changes)
                await conn.execute("COMMIT")
        except BaseException:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await conn.execute("ROLLBACK")
            raise
        return len(f.events)

    return piped if pipeline else plain


# ---------------------------------------------------------------------------- harness

@dataclass
class Contender:
    name: str
    driver: str
    connect: Callable[[str], Awaitable[Any]]
    txn: Callable[[Any, Batch], Awaitable[int]]
    url: str = ""
    known: list[list[str]] = field(default_factory=list)   # per worker
    results: dict[int, list[tuple[float, float]]] = field(default_factory=dict)


def contenders(pools: Pools, binary: bool) -> list[Contender]:
    out = [Contender(f"asyncpg {m}", "asyncpg", asyncpg_connect, asyncpg_txn(m, pools))
           for m in ("executemany", "unnest", "copy")]
    for m in ("executemany", "unnest", "copy", "copy-binary"):
        for p in (False, True):
            out.append(Contender(f"psycopg {m}{' +pipeline' if p else ''}", "psycopg",
                                 psycopg_connect, psycopg_txn(m, p, binary, pools)))
    return out


SEED_TASKS, SEED_EVENTS_PER_TASK = 4000, 4


async def seed(url: str, rng: random.Random, pools: Pools, workers: int) -> list[list[str]]:
    """Schema, some history (tasks, events, changes), ANALYZE: steady-state plans."""
    con = await asyncpg.connect(url)
    try:
        await con.execute(SCHEMA)
        ids = [random_id(rng) for _ in range(SEED_TASKS)]
        now = time.time()
        await con.copy_records_to_table("task_ids", records=[(i,) for i in ids])
        await con.copy_records_to_table("tasks", records=[
            (t, "build", "running", now, SEED_EVENTS_PER_TASK, pools.docs[n % len(pools.docs)],
             pools.keys[n % len(pools.keys)]) for n, t in enumerate(ids)])
        events, changes = [], []
        for n, t in enumerate(ids * SEED_EVENTS_PER_TASK):
            eid = random_id(rng)
            events.append((n + 1, eid, t, "task.updated", "json", "webhook", time.time_ns(),
                           now, now, pools.raws[n % len(pools.raws)]))
            changes.append((n + 1, t, eid, "queued", "running", now, time.time_ns(),
                            pools.docs[n % len(pools.docs)], "task.updated"))
        await con.copy_records_to_table("events", records=events, columns=EVENT_COLS)
        await con.copy_records_to_table("changes", records=changes, columns=CHANGE_COLS)
        await con.execute("UPDATE counters SET events = $1, changes = $1", len(events))
        await con.execute("ANALYZE")
    finally:
        await con.close()
    return [ids[w::workers] for w in range(workers)]


async def verify(c: Contender) -> None:
    """What was committed adds up: seqs dense, counters match, one change per task touch."""
    con = await asyncpg.connect(c.url)
    try:
        row = await con.fetchrow(
            "SELECT (SELECT events FROM counters) AS ce, (SELECT changes FROM counters) AS cc,"
            " (SELECT count(*) FROM events) AS ne, (SELECT max(seq) FROM events) AS me,"
            " (SELECT count(*) FROM changes) AS nc, (SELECT max(seq) FROM changes) AS mc,"
            " (SELECT sum(version) FROM tasks) AS sv")
    finally:
        await con.close()
    if not (row["ce"] == row["ne"] == row["me"] and row["cc"] == row["nc"] == row["mc"]
            and row["sv"] == row["nc"]):
        raise AssertionError(f"{c.name}: inconsistent database {dict(row)}")


async def checkpoint(admin_url: str) -> None:
    con = await asyncpg.connect(admin_url)
    try:
        await con.execute("CHECKPOINT")
    finally:
        await con.close()


async def run_round(c: Contender, size: int, *, workers: int, events: int, rng: random.Random,
                    pools: Pools) -> tuple[float, float]:
    """Equal work: ``events`` events over ``workers`` connections; (events/s, CPU µs/event)."""
    per_worker = max(1, events // (size * workers))
    batches = [make_batches(rng, pools, c.known[w], size, per_worker) for w in range(workers)]
    conns = [await c.connect(c.url) for _ in range(workers)]

    async def work(conn: Any, todo: list[Batch]) -> int:
        return sum([await c.txn(conn, b) for b in todo])

    try:
        gc.collect()
        t0, cpu0 = time.perf_counter(), time.process_time()
        done = sum(await asyncio.gather(*(work(k, b) for k, b in zip(conns, batches, strict=True))))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        for k in conns:
            await k.close()
    return done / elapsed, cpu / done * 1e6


async def timed_rate(c: Contender, size: int, *, workers: int, seconds: float, rng: random.Random,
                     pools: Pools) -> float:
    """A warm-up that also calibrates: grow the work until it takes ``seconds``."""
    events = size * workers * 4
    while True:
        t0 = time.perf_counter()
        rate, _ = await run_round(c, size, workers=workers, events=events, rng=rng, pools=pools)
        if time.perf_counter() - t0 >= seconds:
            return rate
        events *= 4


async def compare(group: list[Contender], size: int, *, workers: int, rounds: int, seconds: float,
                  admin_url: str, rng: random.Random, pools: Pools, label: str) -> None:
    rates = [await timed_rate(c, size, workers=workers, seconds=seconds / 3, rng=rng, pools=pools)
             for c in group]
    events = int(statistics.median(rates) * seconds)
    events = max(events, size * workers)
    for c in group:
        c.results[size] = []
    for r in range(rounds):
        order = group[r % len(group):] + group[:r % len(group)]
        if r % 2:
            order.reverse()
        for c in order:
            await checkpoint(admin_url)
            c.results[size].append(await run_round(c, size, workers=workers, events=events,
                                                   rng=rng, pools=pools))
        print(f"  {label} B={size} round {r + 1}/{rounds}: " + ", ".join(
            f"{c.name} {c.results[size][-1][0]:,.0f}/s" for c in group), file=sys.stderr,
            flush=True)


def medians(c: Contender, size: int) -> tuple[float, float]:
    res = c.results[size]
    return statistics.median(r[0] for r in res), statistics.median(r[1] for r in res)


def load_postgres_local() -> Any:
    path = REPO / "deploy" / "postgres_local.py"
    spec = importlib.util.spec_from_file_location("phasewatch_deploy_postgres_local", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def create_database(admin_url: str, name: str) -> str:
    con = await asyncpg.connect(admin_url)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()
    return admin_url.rsplit("/", 1)[0] + "/" + name


async def bench(args: argparse.Namespace, admin_url: str) -> None:
    rng = random.Random(args.seed)
    pools = Pools.make(rng)
    sizes = [int(s) for s in args.sizes.split(",")]
    workers_for = {s: (1 if s >= 64 else args.concurrency) for s in sizes}
    every = contenders(pools, args.psycopg_binary)
    if args.only:
        every = [c for c in every if c.name in args.only.split(",")]
    for n, c in enumerate(every):
        c.url = await create_database(admin_url, f"pwbench_{n}")
        c.known = await seed(c.url, random.Random(args.seed + 1), pools, args.concurrency)
    print(f"server: {admin_url}; {len(every)} contenders, databases seeded", file=sys.stderr)

    lines: list[str] = []
    for size in sizes:
        workers = workers_for[size]
        best: dict[str, Contender] = {}
        if args.screen_rounds:
            await compare(every, size, workers=workers, rounds=args.screen_rounds,
                          seconds=args.screen_seconds, admin_url=admin_url, rng=rng,
                          pools=pools, label="screen")
            lines.append(f"screening B={size} ({workers} conn), median of {args.screen_rounds}:")
            for c in sorted(every, key=lambda c: -medians(c, size)[0]):
                rate, cpu = medians(c, size)
                lines.append(f"    {c.name:<32} {rate:>9,.0f} ev/s {cpu:>7.1f} µs CPU/ev")
        for c in every:
            if c.driver not in best or (
                    size in c.results and medians(c, size)[0] > medians(best[c.driver], size)[0]):
                best[c.driver] = c
        final = list(best.values())
        mark = len(lines)
        await compare(final, size, workers=workers, rounds=args.rounds, seconds=args.seconds,
                      admin_url=admin_url, rng=rng, pools=pools, label="final")
        for c in final:
            rate, cpu = medians(c, size)
            lines.append(f"  FINAL B={size:<4} {workers} conn  {c.name:<32} {rate:>9,.0f} ev/s"
                         f" {cpu:>7.1f} µs CPU/ev")
        if len(final) == 2:
            a, p = (best["asyncpg"], best["psycopg"])
            ra, ca = medians(a, size)
            rp, cp = medians(p, size)
            paired = statistics.median(
                x[0] / y[0] for x, y in zip(a.results[size], p.results[size], strict=True))
            lines.append(f"  RATIO B={size}: asyncpg/psycopg events/s {ra / rp:.2f}x"
                         f" (median of per-round ratios {paired:.2f}x), CPU/event {ca / cp:.2f}x")
        print("\n".join(lines[mark:]), file=sys.stderr, flush=True)
    for c in every:
        await verify(c)
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,16,1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--screen-rounds", type=int, default=3)
    parser.add_argument("--screen-seconds", type=float, default=1.5)
    parser.add_argument("--concurrency", type=int, default=4,
                        help="connections for the small (webhook-like) sizes")
    parser.add_argument("--psycopg-binary", action=argparse.BooleanOptionalAction, default=True,
                        help="psycopg: binary parameters (%%b) and results (asyncpg always is)")
    parser.add_argument("--only", default="", help="comma-separated contender names")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--url", help="an admin URL of an existing server (else a local one)")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True,
                        help="run on uvloop, as the service does where it is installed")
    args = parser.parse_args()
    run: Callable[[Any], Any] = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    if args.url:
        run(bench(args, args.url))
        return 0
    server = load_postgres_local().LocalPostgres()
    server.start()
    try:
        run(bench(args, server.url))
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
