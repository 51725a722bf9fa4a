"""A batch as rows, and the SQL that reads and writes them inside a transaction.

A planned batch (:func:`plan_rows`) is plain named tuples, so that a batch planned in
one process can be written by another (:mod:`consumer.store.sqlite.process`): the store
itself writes through :func:`write_rows` too, so both paths write the same rows. Used
only inside ``consumer.store.sqlite``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from consumer.core.fold import TaskState
from consumer.core.plan import BatchPlan, DedupKey, encode_keys
from consumer.store.sqlite.schema import CHUNK

__all__ = [
    "ChangeRow",
    "Current",
    "EventRow",
    "Rows",
    "TaskRow",
    "known_events",
    "plan_rows",
    "read_current",
    "read_for_planning",
    "select_in",
    "task_row",
    "write_rows",
]


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
        for no, task_id, doc, keys, version in select_in(
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
    receipt: str | None  # the event's Receipt, encoded (None: none, or an empty one)


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
    traceparent: str | None


@dataclass(slots=True)
class Rows:
    """A planned batch as the rows it writes: named tuples of plain values, so that a
    batch planned in one process can be written by another."""

    events: list[EventRow]
    tasks: list[TaskRow]
    changes: list[ChangeRow]

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (to the writer process) as plain tuples: a named tuple pickles as a
        # class call per row, which took twice as long each way. They come back as
        # plain tuples, which is all the writer does with them: it unpacks them by
        # position (write_rows, write_planned), never by name.
        return (
            Rows,
            (
                [tuple(e) for e in self.events],
                [tuple(t) for t in self.tasks],
                [tuple(c) for c in self.changes],
            ),
        )


def plan_rows(plan: BatchPlan) -> Rows:
    """The rows that write ``plan``. Pure."""
    return Rows(
        [
            EventRow(
                e.id,
                e.task_id,
                e.kind,
                e.format.value,
                e.created_at,
                e.updated_at,
                e.raw,
                None if e.receipt is None else e.receipt.encode(),
            )
            for e in plan.new_events
        ],
        [
            TaskRow(*task_row(task_id, s), task_id in plan.versions_bumped)
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
                c.traceparent,
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
    # By position (row[0]: the task id): rows that crossed from another process are
    # plain tuples (see Rows.__reduce__).
    new_tasks = [row[0] for row in rows.tasks if row[0] not in numbers]
    if new_tasks:
        # We hold the write lock: the next numbers are ours to hand out.
        (top,) = con.execute("SELECT coalesce(max(no), 0) FROM task_numbers").fetchone()
        fresh = list(zip(range(top + 1, top + 1 + len(new_tasks)), new_tasks, strict=True))
        con.executemany("INSERT INTO task_numbers (no, id) VALUES (?, ?)", fresh)
        numbers.update((task_id, no) for no, task_id in fresh)
    con.executemany(
        "INSERT INTO events (event_id, task_no, task_id, kind, format, source, received_at,"
        " created_at, updated_at, raw, receipt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                receipt,
            )
            for event_id, task_id, kind, fmt, created_at, updated_at, raw, receipt in rows.events
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
            " changed_at, recorded_at, task, kind, traceparent)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    traceparent,
                )
                for seq, (
                    task_id,
                    event_id,
                    previous,
                    phase,
                    changed_at,
                    task,
                    kind,
                    traceparent,
                ) in enumerate(rows.changes, start=base + 1)
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
        for task_id, event_id in select_in(
            con,
            "SELECT n.id, e.event_id FROM task_numbers AS n JOIN events AS e"
            " ON e.task_no = n.no WHERE n.id IN ({})",
            list(current),
        ):
            tasks[task_id][2].add(event_id)
        known = {
            event_id
            for (event_id,) in select_in(
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
    for start in range(0, len(chunks), CHUNK // 2):
        chunk = chunks[start : start + CHUNK // 2]
        values = ",".join("(?, ?)" for _ in chunk)
        found = con.execute(
            f"SELECT e.task_no, e.event_id FROM (VALUES {values}) AS v"  # noqa: S608
            " JOIN events AS e ON e.task_no = v.column1 AND e.event_id = v.column2",
            [x for pair in chunk for x in pair],
        ).fetchall()
        known.extend((ids[no], event_id) for no, event_id in found)
    known.extend(
        (None, event_id)
        for (event_id,) in select_in(
            con,
            "SELECT event_id FROM events WHERE task_no IS NULL AND event_id IN ({})",
            list(untasked),
        )
    )
    return known


def select_in(con: sqlite3.Connection, sql: str, values: Sequence[str | int]) -> list[Any]:
    rows: list[Any] = []
    for start in range(0, len(values), CHUNK):
        chunk = values[start : start + CHUNK]
        rows.extend(con.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall())
    return rows


def task_row(
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
