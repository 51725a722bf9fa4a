"""The store seam: what every backend keeps, the small role Protocols it implements,
and the contract they share. Nothing backend-specific (SQL, connections, rowids,
processes) crosses these Protocols.

A store keeps four things:

* the **history**: every accepted event (raw bytes, source, receipt time, and its
  :class:`~consumer.core.receipt.Receipt`: which webhook secret verified it, the
  request's trace context), append-only, deduplicated by ``(task id, event id)`` (see
  :data:`~consumer.core.plan.DedupKey`);
* the **view**: the latest materialized task per id (with the per-field fold keys);
* the **outbox**: the phase changes recorded, each with a store-wide ``seq`` (and the
  ``traceparent`` of the event that made it); and for each handler a cursor and
  delivery records;
* **leases** and small **meta** notes (checkpoints);
* the **stale alerts** recorded: ``(task, phase, updatedAt, stale_for)`` once each.

Deciding what a batch does is :func:`~consumer.core.plan.plan_batch`, pure and shared,
so backends differ only in how they read and write rows.

Roles, and who uses which (one backend class implements them all; see :class:`Store`):

=====================  =================================================  ===============
role                   methods                                            used by
=====================  =================================================  ===============
:class:`IngestStore`   ``ingest``, ``ingest_raw``, ``pipeline_depth``     sources, import
:class:`ViewStore`     ``get_task``, ``list_tasks``, ``stats``            API, CLI
:class:`HistoryStore`  ``task_history``, ``history_after``, ...           API, rebuild,
                                                                          export
:class:`RebuildStore`  ``stage_rebuilt``, ``swap_rebuilt``, ...           rebuild
:class:`OutboxStore`   changes, cursors, delivery records                 dispatch,
                                                                          replay, API
:class:`LeaseStore`    ``acquire_lease``, ``release_lease``               dispatch
:class:`MetaStore`     ``get_meta``, ``set_meta``                         long jobs
:class:`StaleStore`    ``record_stale``, ``count_stale``                  the sweeper
=====================  =================================================  ===============

The contract
------------
**Atomic.** One ``ingest``/``ingest_raw`` call is one transaction: its new history
rows, view rows and outbox changes are all committed or none is. A backend may split
one call into several transactions only if each is all-or-nothing *by task* and a retry
of the whole call after a partial failure finds the committed part as duplicates (the
SQLite writer process does, by record key). ``record_deliveries`` is atomic.
``swap_rebuilt`` replaces the view atomically.

**Idempotent.** Ingesting an event whose dedup key is stored does nothing and reports
``DUPLICATE``. Since the fold is a join, ingesting the same events again, in any order or
split, leaves the same view and records no second phase change. ``set_cursor``,
``set_meta``, ``record_deliveries`` (insert or replace by ``(handler, seq, replay)``) and
``acquire_lease`` by the holder are idempotent too.

**Visible in commit order.** This is what the dispatcher and rebuild rely on, and what a
multi-writer backend must keep. Once a reader has seen a change with ``seq = n``
(``changes_after``), every change it will ever see later has ``seq > n``: a change is
never committed *behind* a seq that a reader could already have read. Likewise for the
history's ``seq`` (``history_after``, ``stats().last_event_seq``). The dispatcher keeps a
cursor per handler and reads ``changes_after(cursor)``; rebuild reads the history up to
``last_event_seq`` and later folds in ``seq > upto``. A change committed behind the
cursor would be skipped for good. A single writer (SQLite) gives this for free; a
backend with concurrent writers must serialize seq allocation with commit (PostgreSQL
does: the seqs are taken last, under one row lock held until COMMIT), or expose only
seqs below a visibility watermark (all transactions that could still commit a lower seq
have ended).

**Within a task**, changes have increasing seqs in the order the fold made them, so a
dispatcher that delivers per task in seq order delivers in fold order.

**Stale alerts, once.** ``record_stale`` finds, in one transaction, the tasks that
stayed in a phase with no newer snapshot for ``stale_for`` and records for each a change
of kind ``stale:<ms>`` in the outbox (its seq taken like any change's, so the commit
order rule holds) together with a note that this ``(task, phase, status.updatedAt,
stale_for)`` was alerted, so it is never alerted again, whoever sweeps (a restart, two
replicas at once). A newer snapshot (a new ``updatedAt``) is a new wait. Only tasks
whose current state was reached live are watched: the last phase change recorded for
the task led to the current phase, or an event with the current ``updatedAt`` came from
a live source (not in :data:`REPLAYED_SOURCES`). So an import or a Kafka replay without
``--fire-handlers`` (which records no change) never alerts.

**Concurrency.** Every method is a coroutine, safe to call concurrently from one event
loop; a backend serializes its own writes, or (PostgreSQL) makes concurrent ones safe by
locking the tasks a batch folds, in id order. Several processes may share one store (a
CLI import next to the service; replicas on one PostgreSQL database); they share the
dispatch lanes through leases (:mod:`consumer.dispatch.dispatcher`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import orjson

from consumer.core.change import ChangeRecord
from consumer.core.codec import DecodeError, Event, EventFormat, decode
from consumer.core.fold import TaskState
from consumer.core.plan import Outcome
from consumer.core.receipt import Receipt

__all__ = [
    "REPLAYED_SOURCES",
    "ChangeRecord",
    "Cursor",
    "Delivery",
    "DeliveryStatus",
    "HistoryEntry",
    "HistoryStore",
    "IngestResult",
    "IngestStore",
    "LeaseStore",
    "MetaStore",
    "OutboxStore",
    "Outcome",
    "RawIngestResult",
    "RebuildStore",
    "Receipt",
    "Rejected",
    "StaleStore",
    "Store",
    "StoreOpenError",
    "StoreStats",
    "StoredTask",
    "TaskPage",
    "TaskQuery",
    "ViewStore",
    "decode_all",
    "ingest_decoded",
    "receipts_of",
    "with_rejections",
]


REPLAYED_SOURCES: tuple[str, ...] = ("import", "kafka-replay")
"""History sources that fold the past (``phasewatch import``, ``replay kafka``): a task
whose current snapshot arrived only from them is not watched for stale alerts unless
that fold recorded its phase change (``--fire-handlers``)."""


class StoreOpenError(Exception):
    """The store cannot be opened, and retrying will not help: a file that is not a
    database, is read-only or cannot be created; a schema this version cannot use. The
    message names the file or the setting; the CLI prints it as one line and exits 2."""


class DeliveryStatus(StrEnum):
    DONE = "done"  # the handler returned normally: never delivered again
    DEAD = "dead"  # failed for good (permanent error, attempts or age exhausted)
    REDRIVE = "redrive"  # a dead letter an operator asked to retry
    DROPPED = "dropped"  # a dead letter an operator gave up on
    FAILING = "failing"  # still being retried; attempts and last error so far


@dataclass(frozen=True, slots=True)
class Delivery:
    """The record of one (change, handler) delivery. Replays are recorded apart."""

    handler: str
    seq: int
    status: DeliveryStatus
    attempts: int
    first_attempt_at: int  # Unix ms
    last_attempt_at: int
    error: str | None = None
    replay: bool = False


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A materialized task as read back from the view (not yet redacted)."""

    task: dict[str, Any]
    version: int  # bumps on every change of the materialized task

    @property
    def id(self) -> str:
        return str(self.task["id"])

    @property
    def phase(self) -> str:
        return str(self.task["status"]["phase"])

    @property
    def updated_at(self) -> int | float:
        value: int | float = self.task["status"]["updatedAt"]
        return value


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One accepted event as kept in the history. ``receipt``: what its receiver knew
    of how it arrived (None: nothing, e.g. an unsigned, untraced or Kafka message)."""

    seq: int
    event_id: str
    kind: str
    format: EventFormat
    source: str
    received_at: int
    created_at: int | float
    task_id: str | None
    raw: bytes
    receipt: Receipt | None = None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Position in the ``(status.updatedAt, id)`` order of the view, opaque to clients."""

    updated_at: int | float
    task_id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(orjson.dumps([self.updated_at, self.task_id])).decode()

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            updated_at, task_id = orjson.loads(base64.urlsafe_b64decode(text.encode()))
        except (ValueError, TypeError, orjson.JSONDecodeError):
            raise ValueError("cursor is not one this API issued") from None
        if (
            isinstance(updated_at, bool)
            or not isinstance(updated_at, int | float)
            or not isinstance(task_id, str)
            # Beyond what a database integer holds (and what any task carries).
            or not -(2**63) <= updated_at < 2**63
        ):
            raise ValueError("cursor is not one this API issued")
        return cls(updated_at, task_id)


@dataclass(frozen=True, slots=True)
class TaskQuery:
    phases: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    updated_since: int | float | None = None  # status.updatedAt >= this (ms)
    after: Cursor | None = None
    limit: int = 100
    descending: bool = False


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[StoredTask]
    next_cursor: Cursor | None


@dataclass(frozen=True, slots=True)
class StoreStats:
    events: int
    tasks: int
    changes: int
    last_change_seq: int
    last_event_seq: int = 0
    # Figures of the backend's own machinery (name -> count), for /readyz and /metrics:
    # e.g. the SQLite writer process's refused plans. Names are snake_case.
    backend: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """One outcome per event of the batch, in order, and the phase changes it recorded."""

    outcomes: list[Outcome]
    changes: list[ChangeRecord]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A raw message that does not decode to an event: stored nowhere, reported back."""

    reason: str  # a DecodeError reason: not_json, not_an_event, invalid_event
    message: str  # what is wrong, for people


@dataclass(frozen=True, slots=True)
class RawIngestResult:
    """One outcome per raw message of the batch, in order, and the changes recorded."""

    outcomes: list[Outcome | Rejected]
    changes: list[ChangeRecord]

    @property
    def rejected(self) -> list[tuple[int, Rejected]]:
        return [(i, o) for i, o in enumerate(self.outcomes) if isinstance(o, Rejected)]


def decode_all(
    raws: Sequence[bytes], receipts: Sequence[Receipt | None] | None = None
) -> tuple[list[Event], dict[int, Rejected]]:
    """Decode a batch of raw messages: the events (each given its receipt, by position),
    and what is wrong with the others (by position)."""
    if receipts is not None and len(receipts) != len(raws):
        raise ValueError(f"{len(receipts)} receipts for {len(raws)} messages")
    events: list[Event] = []
    rejected: dict[int, Rejected] = {}
    for i, raw in enumerate(raws):
        try:
            event = decode(raw)
        except DecodeError as exc:
            rejected[i] = Rejected(exc.reason, str(exc))
            continue
        if receipts is not None:
            event.receipt = receipts[i]
        events.append(event)
    return events, rejected


def receipts_of(events: Sequence[Event]) -> list[Receipt | None] | None:
    """The events' receipts, by position, or None when none has one (the usual case off
    the webhook path, which then costs nothing to carry)."""
    receipts = [e.receipt for e in events]
    return receipts if any(r is not None for r in receipts) else None


async def ingest_decoded(
    store: IngestStore,
    raws: Sequence[bytes],
    source: str,
    received_at: int,
    *,
    record_changes: bool = True,
    receipts: Sequence[Receipt | None] | None = None,
) -> RawIngestResult:
    """:meth:`IngestStore.ingest_raw` for a backend that decodes where it runs: decode here,
    ingest the events, put the rejections back in place."""
    events, rejected = decode_all(raws, receipts)
    result = await store.ingest(events, source, received_at, record_changes=record_changes)
    return with_rejections(result, rejected, len(raws))


def with_rejections(
    result: IngestResult, rejected: Mapping[int, Rejected], total: int
) -> RawIngestResult:
    """Put the rejections back in their places among the events' outcomes."""
    if not rejected:
        return RawIngestResult(list(result.outcomes), result.changes)
    accepted = iter(result.outcomes)
    outcomes: list[Outcome | Rejected] = [
        rejected[i] if i in rejected else next(accepted) for i in range(total)
    ]
    return RawIngestResult(outcomes, result.changes)


class IngestStore(Protocol):
    """Ingestion: store, fold and record a batch (the sources, imports, replays)."""

    @property
    def pipeline_depth(self) -> int:
        """How many batches a caller should keep in flight: 1 for a backend that writes
        on the caller's loop; more for one that queues batches to a writer of its own,
        so that the writer starts the next as soon as it commits one."""
        ...

    async def ingest(
        self,
        events: Sequence[Event],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
    ) -> IngestResult:
        """Store, fold and record the phase changes of a batch, in one transaction.
        All or nothing. ``record_changes=False`` (imports, replays of old history) folds
        without putting changes in the outbox, so handlers do not hear about the past.
        Each event's :attr:`~consumer.core.codec.Event.receipt` is kept with it in the
        history, and a change keeps the ``traceparent`` of the event that made it."""
        ...

    async def ingest_raw(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
        keys: Sequence[bytes | None] | None = None,
        receipts: Sequence[Receipt | None] | None = None,
    ) -> RawIngestResult:
        """:meth:`ingest` from raw messages: decoding is part of the backend's work (a
        backend may do it off the caller's process). A message that does not decode is
        reported as :class:`Rejected` and does not fail its batch.

        ``keys``: each message's partition key where the caller has one (a Kafka record
        key: the task id). A backend may spread its work by them; they never change the
        result. ``receipts``: each message's :class:`~consumer.core.receipt.Receipt` (or
        None), by position, kept as :attr:`~consumer.core.codec.Event.receipt` would be;
        they never change outcomes, the view or which changes are recorded."""
        ...


class ViewStore(Protocol):
    """The materialized view, read."""

    async def get_task(self, task_id: str) -> StoredTask | None: ...

    async def list_tasks(self, query: TaskQuery) -> TaskPage: ...

    async def stats(self) -> StoreStats: ...


class HistoryStore(Protocol):
    """The append-only history, read."""

    async def task_history(self, task_id: str) -> list[HistoryEntry]: ...

    async def history_after(
        self, seq: int, limit: int = 1000, *, task_id: str | None = None
    ) -> list[HistoryEntry]:
        """The history in arrival order (``seq``) past ``seq``, optionally of one task."""
        ...

    async def task_ids_after(self, after: str | None, limit: int = 500) -> list[str]:
        """Ids of tasks that have history, in id order, past ``after``."""
        ...

    async def history_of_tasks(self, task_ids: Sequence[str], upto_seq: int) -> list[HistoryEntry]:
        """Those tasks' events with ``seq <= upto_seq``, by task then seq."""
        ...

    async def stats(self) -> StoreStats: ...


class RebuildStore(Protocol):
    """Replacing the view with one folded anew from the history."""

    async def stage_rebuilt(self, states: Mapping[str, TaskState]) -> None:
        """Keep rebuilt task states aside (not visible) until :meth:`swap_rebuilt`."""
        ...

    async def swap_rebuilt(self, upto_seq: int) -> int:
        """Atomically replace the view with the staged states, after folding into them the
        events that arrived past ``upto_seq`` meanwhile. Returns the view's task count."""
        ...

    async def discard_rebuilt(self) -> None: ...


class OutboxStore(Protocol):
    """Recorded changes, each handler's cursor, and the record of every delivery."""

    async def task_changes(self, task_id: str) -> list[ChangeRecord]: ...

    async def changes_after(self, seq: int, limit: int = 500) -> list[ChangeRecord]:
        """Outbox entries with a larger ``seq``, in commit order (see the contract)."""
        ...

    async def changes_by_seq(self, seqs: Sequence[int]) -> list[ChangeRecord]: ...

    async def get_cursor(self, handler: str) -> int | None:
        """Every change up to this seq is resolved for ``handler`` (None: never started)."""
        ...

    async def set_cursor(self, handler: str, seq: int) -> None: ...

    async def set_cursors(self, cursors: Mapping[str, int]) -> None:
        """:meth:`set_cursor` for many, in one transaction (a dispatcher saves a cursor
        per handler and lane: one commit, not one each)."""
        ...

    async def record_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        """Insert or replace delivery records (keyed by handler, seq, replay), atomically."""
        ...

    async def deliveries_for(
        self, handler: str, seqs: Sequence[int], *, replay: bool = False
    ) -> dict[int, Delivery]:
        """The delivery records of ``handler`` among ``seqs``, by seq."""
        ...

    async def list_deliveries(
        self, statuses: Sequence[DeliveryStatus], handler: str | None = None, limit: int = 100
    ) -> list[Delivery]: ...

    async def set_delivery_status(
        self,
        frm: DeliveryStatus,
        to: DeliveryStatus,
        *,
        handler: str | None = None,
        seqs: Sequence[int] | None = None,
    ) -> int:
        """Move records in status ``frm`` (optionally of one handler / some seqs) to
        ``to``; returns how many moved. How dead letters are re-driven or dropped."""
        ...

    async def stats(self) -> StoreStats: ...

    async def listen_changes(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (on this loop) whenever any process commits changes to this store,
        until :meth:`Store.close`; a dispatcher waits on it rather than on its poll
        alone. A backend that cannot tell (SQLite, memory) does nothing: changes committed
        by this process wake the dispatcher directly, and others are found by its poll."""
        ...

    async def oldest_change_seq(self) -> int:
        """1 + the highest seq :meth:`prune_changes` removed (1 when none was): a reader
        whose cursor is below this minus one has missed changes (the feed's 410)."""
        ...

    async def prune_changes(
        self,
        *,
        before_ms: int | None = None,
        keep_last: int | None = None,
        needed_by: Sequence[str] | None = None,
    ) -> int:
        """Delete outbox changes recorded before ``before_ms`` and/or all but the newest
        ``keep_last``; the history is untouched. Never a change a handler still needs:
        none past the lowest cursor of the handlers named in ``needed_by`` (a cursor
        ``name`` or ``name@lane...``; None: every cursor), and none with a delivery
        record that is not final (failing, dead, redrive). Returns how many went."""
        ...


class LeaseStore(Protocol):
    """Named leases, so that processes sharing a store agree on one holder of each.
    ``now_ms`` is the caller's clock: processes on several hosts need clocks in step
    (NTP) well within a lease's time."""

    async def acquire_lease(
        self, name: str, owner: str, ttl_ms: int, now_ms: int, *, take_from: str | None = None
    ) -> str:
        """Take or renew the named lease for ``owner`` until ``now_ms + ttl_ms`` when it is
        free, expired, already ``owner``'s, or held by ``take_from`` (a holder known dead).
        Returns the holder afterwards."""
        ...

    async def acquire_leases(
        self, names: Sequence[str], owner: str, ttl_ms: int, now_ms: int
    ) -> list[str]:
        """:meth:`acquire_lease` for each of ``names``, in one transaction; the holders
        afterwards, in order. How a dispatcher renews its lanes: one commit per round,
        not one per lane, so delivery records do not queue behind them."""
        ...

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (a graceful stop)."""
        ...

    async def lease_holders(self, prefix: str, now_ms: int) -> dict[str, str]:
        """The unexpired leases whose name starts with ``prefix``: name -> holder. How a
        process sees the others (member leases) and who holds which dispatch lane."""
        ...


class MetaStore(Protocol):
    """Small persistent key-value notes: checkpoints of long jobs and the like."""

    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str | None) -> None:
        """Set or (``None``) delete a note."""
        ...


class StaleStore(Protocol):
    """Stale alerts: tasks left in a phase (spec §7: Studio leaves a running task that
    stopped reporting in "running" for good)."""

    async def record_stale(
        self, phase: str, stale_for_ms: int, now_ms: int, limit: int = 500
    ) -> list[ChangeRecord]:
        """In one transaction: the watched tasks (see the contract) in ``phase`` whose
        ``status.updatedAt <= now_ms - stale_for_ms`` and whose ``(task, phase,
        updatedAt, stale_for_ms)`` has no alert yet, at most ``limit`` (oldest first),
        each recorded as a change of kind :func:`~consumer.core.change.stale_kind` (its
        ``previous_phase`` is ``phase``, ``changed_at`` the ``updatedAt``, ``event_id``
        the event whose snapshot went stale, ``recorded_at`` ``now_ms``) and noted as
        alerted. Returns the changes recorded, in seq order."""
        ...

    async def count_stale(self, phase: str, stale_for_ms: int, now_ms: int) -> int:
        """How many tasks are in ``phase`` with ``status.updatedAt <= now_ms -
        stale_for_ms`` (watched or not, alerted or not): the gauge."""
        ...


class Store(
    IngestStore,
    ViewStore,
    HistoryStore,
    RebuildStore,
    OutboxStore,
    LeaseStore,
    MetaStore,
    StaleStore,
    Protocol,
):
    """A whole backend: every role, plus its lifecycle. Composition roots (the service,
    the CLI) hold one of these; everything else takes the role it uses."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...
