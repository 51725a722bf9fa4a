"""Planning a batch ahead of the SQLite writer, so that the writer process only writes.

With :class:`~consumer.store.sqlite.process.SQLiteProcessStore`, the writer process decodes,
folds and writes every batch on one core, while a Kafka consumer's own process mostly
waits for it. A caller whose process has a core to spare (``ingest_raw(...,
decode_here=True)``) decodes and folds the batch itself: :class:`Planner` turns raw
messages into the rows to write (:class:`~consumer.store.sqlite.store.Rows`), and the writer
process only checks and writes them.

The plan is optimistic: it is made against what the planner believes the store holds,
before the write transaction starts. What it assumed travels with it, and
:func:`write_planned` checks that inside the transaction:

* the view row of every task the batch folds an event into is, byte for byte, the one
  the plan started from (or still absent);
* the history holds exactly the batch's events the plan counted as duplicates.

When a check fails (another writer got there first: a CLI import, the webhook path, a
rebuild; a batch before this one failed), the writer ignores the plan and decodes and
folds the batch itself, as it would without one. So what the planner believes decides
only how often a plan is used, never what is written.

The planner believes a cache: for each task seen recently, its view row and the ids of
its events, as the planner's own plans left them (it plans batch N+1 while the writer
still writes batch N). A task it has not seen is read from the database on the
caller's read connection (the caller passes the read in).
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import orjson

from consumer.core.codec import Event
from consumer.core.fold import TaskState
from consumer.core.plan import DedupKey, NewChange, Outcome, decode_keys, plan_batch
from consumer.core.receipt import Receipt
from consumer.store.base import IngestResult, Rejected, decode_all, with_rejections
from consumer.store.sqlite.rows import Rows, known_events, plan_rows, read_current, write_rows

__all__ = ["Loaded", "Plan", "Planned", "Planner", "write_planned"]

ViewRow = tuple[bytes | None, bytes | None]
"""A task's view row as the writer will compare it: ``(doc, keys)``, None when absent."""


@dataclass(slots=True)
class Planned:
    """What crosses to the writer: the rows, and what the plan assumed."""

    rows: Rows
    assumed: dict[str, ViewRow]  # each task an event of the batch folds into
    known: list[DedupKey]  # the batch's events the plan counted as already stored


@dataclass(slots=True)
class Plan:
    """A planned batch and what its caller answers once the writer took the plan."""

    batch: int
    planned: Planned
    outcomes: list[Outcome | Rejected]
    changes: list[NewChange]  # their outbox seqs follow the one the writer reports
    task_ids: set[str]


@dataclass(slots=True)
class Loaded:
    """Read from the database for tasks the planner has not seen: their view rows and
    event ids (tasks with no history are absent), and which untasked events are stored."""

    tasks: dict[str, tuple[bytes | None, bytes | None, set[str]]]
    untasked_known: set[str]


@dataclass(slots=True)
class _Cached:
    state: TaskState | None  # None: no view row
    doc: bytes | None
    keys: bytes | None
    events: set[str] = field(default_factory=set)
    batch: int = 0  # the last batch planned against this entry


Load = Callable[[list[str], list[str]], Awaitable[Loaded]]


class Planner:
    """Plans batches one at a time, in the order they will be written. Not safe for
    concurrent :meth:`plan` calls: the caller serializes them, and sends each plan to
    the writer before making the next."""

    def __init__(self, load: Load, *, record_updates: bool, max_tasks: int = 4_000) -> None:
        self._load = load
        self._record_updates = record_updates
        self._max_tasks = max_tasks
        # In least recently planned order. An entry a batch in flight planned against is
        # never evicted: the database does not show that batch yet.
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._batch = 0
        self._settled = 0  # every batch up to this one has been answered
        self.used = 0  # plans the writer wrote
        self.refused = 0  # plans the writer found stale (or could not answer)

    async def plan(
        self,
        raws: Sequence[bytes],
        record_changes: bool,
        receipts: Sequence[Receipt | None] | None = None,
    ) -> Plan:
        """Plan a batch; ``receipts`` go with the raws by position into the rows."""
        events, rejected = decode_all(raws, receipts)
        task_ids = {e.task_id for e in events if e.task_id is not None}
        cache = self._cache
        untasked: list[str] | None = [e.id for e in events if e.task_id is None]
        untasked_known: set[str] = set()
        # Until every task of the batch has an entry: an answer that arrives while the
        # store is read may drop entries (settle), so look again after each read.
        while (missing := [t for t in task_ids if t not in cache]) or untasked:
            loaded = await self._load(missing, untasked or [])
            if untasked:
                untasked_known, untasked = loaded.untasked_known, None
            for task_id in missing:
                found = loaded.tasks.get(task_id)
                if found is None:
                    cache[task_id] = _Cached(None, None, None)
                    continue
                doc, keys, event_ids = found
                state = (
                    None
                    if doc is None or keys is None
                    else TaskState(orjson.loads(doc), decode_keys(keys))
                )
                cache[task_id] = _Cached(state, doc, keys, event_ids)
        return self._plan(
            events, task_ids, rejected, len(raws), untasked_known, record_changes=record_changes
        )

    def _plan(
        self,
        events: list[Event],
        task_ids: set[str],
        rejected: dict[int, Rejected],
        total: int,
        untasked_known: set[str],
        *,
        record_changes: bool,
    ) -> Plan:
        cache = self._cache
        known: list[DedupKey] = []
        for e in events:
            owner = e.task_id
            if e.id in (untasked_known if owner is None else cache[owner].events):
                known.append((owner, e.id))
        states = {t: s for t in task_ids if (s := cache[t].state) is not None}
        plan = plan_batch(
            events,
            known,
            states,
            record_updates=self._record_updates,
            record_changes=record_changes,
        )
        rows = plan_rows(plan)

        assumed: dict[str, ViewRow] = {}
        for e in plan.new_events:
            if (owner := e.task_id) is not None:
                entry = cache[owner]
                if owner not in assumed:
                    assumed[owner] = (entry.doc, entry.keys)
                entry.events.add(e.id)
        for row in rows.tasks:
            entry = cache[row.task_id]
            entry.state, entry.doc, entry.keys = plan.states[row.task_id], row.doc, row.keys
        self._batch += 1
        for task_id in task_ids:
            cache[task_id].batch = self._batch
            cache.move_to_end(task_id)
        self._evict()

        outcomes = with_rejections(IngestResult(plan.outcomes, []), rejected, total).outcomes
        return Plan(self._batch, Planned(rows, assumed, known), outcomes, plan.changes, task_ids)

    def settle(self, plan: Plan, *, used: bool) -> None:
        """The writer answered ``plan``'s batch. If it did not use the plan (or failed),
        forget its tasks: what the cache holds for them may not be what was written."""
        self._settled = max(self._settled, plan.batch)
        if used:
            self.used += 1
        else:
            self.refused += 1
            for task_id in plan.task_ids:
                self._cache.pop(task_id, None)
        self._evict()

    def forget(self) -> None:
        """Forget everything (the writer was replaced; batches in flight were lost)."""
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    def _evict(self) -> None:
        cache = self._cache
        while len(cache) > self._max_tasks:
            oldest, entry = cache.popitem(last=False)
            if entry.batch > self._settled:
                cache[oldest] = entry
                cache.move_to_end(oldest, last=False)
                break


def write_planned(
    con: sqlite3.Connection, planned: Planned, source: str, received_at: int
) -> int | None:
    """In the writer's transaction: write ``planned`` if what it assumed holds, and return
    the outbox seq its changes follow; None (nothing written) if it does not."""
    # By position: the rows crossed from another process as plain tuples (Rows.__reduce__).
    checked: list[DedupKey] = [(row[1], row[0]) for row in planned.rows.events]
    checked.extend(planned.known)
    current = read_current(con, {t for t, _ in checked if t is not None})
    for task_id, view_row in planned.assumed.items():
        now = current.get(task_id)
        if view_row != ((None, None) if now is None else (now.doc, now.keys)):
            return None
    numbers = {task_id: c.no for task_id, c in current.items()}
    if set(known_events(con, checked, numbers)) != set(planned.known):
        return None
    return write_rows(con, planned.rows, current, source, received_at)
