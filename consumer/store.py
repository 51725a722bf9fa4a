"""The store seam: what every backend keeps, the Protocol they implement, and the pure
batch planner they share.

A store keeps three things, written together in one transaction per batch:

* the **history**: every accepted event (raw bytes, source, receipt time), append-only,
  deduplicated by event id (within its task: see :data:`EventKey`);
* the **view**: the latest materialized task per id (with the per-field fold keys);
* the **outbox**: phase changes still to be handed to handlers.

Backends differ only in how they read and write rows. Deciding what a batch does —
which events are duplicates, the new state of each task, which phase changes to record —
is :func:`plan_batch`, pure and shared, so SQLite, PostgreSQL and the in-memory fake
cannot drift apart. Nothing backend-specific (SQL, connections, rowids) crosses the
Protocol.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import orjson

from consumer.codec import DecodeError, Event, EventFormat, decode
from consumer.fold import Key, TaskState, fold_into
from consumer.fold import event_key as fold_key

__all__ = [
    "BatchPlan",
    "ChangeRecord",
    "Cursor",
    "Delivery",
    "DeliveryStatus",
    "EventKey",
    "HistoryEntry",
    "IngestResult",
    "NewChange",
    "Outcome",
    "RawIngestResult",
    "Rejected",
    "Store",
    "StoreStats",
    "StoredTask",
    "TaskPage",
    "TaskQuery",
    "decode_all",
    "decode_keys",
    "encode_keys",
    "event_key",
    "ingest_decoded",
    "plan_batch",
    "with_rejections",
]


class Outcome(StrEnum):
    ACCEPTED = "accepted"  # new event, now in the history (and folded, if a task event)
    DUPLICATE = "duplicate"  # event id already in the history: nothing done


@dataclass(slots=True)
class NewChange:
    """A phase change computed by :func:`plan_batch`, not yet given an outbox sequence.
    Not frozen, for the same reason as :class:`~consumer.codec.Event`."""

    task_id: str
    event_id: str
    previous_phase: str | None
    phase: str
    changed_at: int | float  # status.updatedAt of the snapshot that moved the phase
    task: dict[str, Any]  # the materialized task right after the change
    kind: str = "phase"  # "phase", or "update" (recorded only when asked for)

    def recorded(self, seq: int, recorded_at: int) -> ChangeRecord:
        """This change as the outbox holds it once given ``seq``."""
        return ChangeRecord(
            seq,
            self.task_id,
            self.event_id,
            self.previous_phase,
            self.phase,
            self.changed_at,
            recorded_at,
            self.task,
            self.kind,
        )


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """A phase change as recorded in the outbox. ``seq`` orders changes store-wide."""

    seq: int
    task_id: str
    event_id: str
    previous_phase: str | None
    phase: str
    changed_at: int | float
    recorded_at: int  # Unix ms when phasewatch committed it
    task: dict[str, Any]  # the materialized task right after the change (not redacted)
    kind: str = "phase"  # "phase": the phase moved; "update": anything else changed

    @property
    def task_type(self) -> str | None:
        value = self.task.get("type")
        return value if isinstance(value, str) else None


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
    """One accepted event as kept in the history."""

    seq: int
    event_id: str
    kind: str
    format: EventFormat
    source: str
    received_at: int
    created_at: int | float
    task_id: str | None
    raw: bytes


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
        if not isinstance(updated_at, int | float) or not isinstance(task_id, str):
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
    # With decode_here: the caller's plan had gone stale (another writer touched its
    # tasks first), so the store decoded and folded the batch itself. Same result.
    refolded: bool = False

    @property
    def rejected(self) -> list[tuple[int, Rejected]]:
        return [(i, o) for i, o in enumerate(self.outcomes) if isinstance(o, Rejected)]


def decode_all(raws: Sequence[bytes]) -> tuple[list[Event], dict[int, Rejected]]:
    """Decode a batch of raw messages: the events, and what is wrong with the others
    (by position)."""
    events: list[Event] = []
    rejected: dict[int, Rejected] = {}
    for i, raw in enumerate(raws):
        try:
            events.append(decode(raw))
        except DecodeError as exc:
            rejected[i] = Rejected(exc.reason, str(exc))
    return events, rejected


async def ingest_decoded(
    store: Store,
    raws: Sequence[bytes],
    source: str,
    received_at: int,
    *,
    record_changes: bool = True,
) -> RawIngestResult:
    """:meth:`Store.ingest_raw` for a backend that decodes where it runs: decode here,
    ingest the events, put the rejections back in place."""
    events, rejected = decode_all(raws)
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


@dataclass(slots=True)
class BatchPlan:
    """What one batch does to a store; backends write it in one transaction."""

    outcomes: list[Outcome] = field(default_factory=list)
    new_events: list[Event] = field(default_factory=list)
    states: dict[str, TaskState] = field(default_factory=dict)  # tasks to write
    versions_bumped: set[str] = field(default_factory=set)  # tasks whose materialized value changed
    changes: list[NewChange] = field(default_factory=list)


EventKey = tuple[str | None, str]
"""What the history deduplicates on: ``(task id, event id)``; task id None for non-task
events. An event id is unique per event in Livepeer's feeds, so this is event-id dedup;
scoping it by task lets a backend keep the check next to the task's other events (recent
tasks cluster together), instead of in one index of random ids that every batch dirties
all over."""


def event_key(event: Event) -> EventKey:
    """The deduplication key of ``event`` (see :data:`EventKey`)."""
    return (event.task_id, event.id)


def plan_batch(
    events: Sequence[Event],
    known: Iterable[EventKey],
    states: Mapping[str, TaskState],
    *,
    record_updates: bool = False,
    record_changes: bool = True,
) -> BatchPlan:
    """Decide what a batch does, given the event keys already stored among the batch's and
    the current state of the tasks it touches (absent: never seen). With
    ``record_updates``, a change of the materialized task that keeps its phase is recorded
    too (kind "update"), for handlers that want progress."""
    seen = set(known)
    plan = BatchPlan()
    # One working copy per task for the whole batch, folded into in place: copying the
    # task for every event was most of the planning time. ``states`` is never mutated.
    work: dict[str, TaskState] = {}
    for event in events:
        task_id = event.task_id
        key = (task_id, event.id)
        if key in seen:
            plan.outcomes.append(Outcome.DUPLICATE)
            continue
        seen.add(key)
        plan.outcomes.append(Outcome.ACCEPTED)
        plan.new_events.append(event)
        if task_id is None:
            continue
        snapshot = event.snapshot
        if snapshot is None:  # a decoded task event always carries one
            raise ValueError(f"event {event.id!r} ({event.kind}) carries no task snapshot")
        order = fold_key(event)
        state = work.get(task_id)
        if state is None:
            before = states.get(task_id)
            if before is None:
                state = work[task_id] = TaskState(dict(snapshot), dict.fromkeys(snapshot, order))
                plan.states[task_id] = state
                plan.versions_bumped.add(task_id)
                if record_changes:
                    plan.changes.append(_change(event, None, state, "phase"))
                continue
            state = work[task_id] = TaskState(dict(before.task), dict(before.keys))
        previous = state.phase
        took, changed = fold_into(state.task, state.keys, snapshot, order)
        if not took:
            continue
        plan.states[task_id] = state
        if changed:
            plan.versions_bumped.add(task_id)
        if not record_changes:
            continue
        if state.phase != previous:
            plan.changes.append(_change(event, previous, state, "phase"))
        elif record_updates and changed:
            plan.changes.append(_change(event, previous, state, "update"))
    return plan


def _change(event: Event, previous: str | None, state: TaskState, kind: str) -> NewChange:
    # A copy: later events of the batch go on folding into the working state. Values are
    # replaced, never mutated, so a shallow one is enough.
    task = dict(state.task)
    return NewChange(
        str(event.task_id), event.id, previous, state.phase, state.updated_at, task, kind
    )


def encode_keys(keys: Mapping[str, Key]) -> bytes:
    """Per-field fold keys, compactly: most fields share the key of one snapshot."""
    distinct: dict[Key, int] = {}
    fields: dict[str, int] = {}
    for name, key in keys.items():
        fields[name] = distinct.setdefault(key, len(distinct))
    return orjson.dumps({"k": list(distinct), "f": fields})


def decode_keys(blob: bytes | str) -> dict[str, Key]:
    doc = orjson.loads(blob)
    table = [(k[0], k[1], k[2]) for k in doc["k"]]
    return {name: table[index] for name, index in doc["f"].items()}


class Store(Protocol):
    """A backend. All methods are coroutines; implementations must be safe to call
    concurrently from one event loop (they serialize writes themselves)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

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
        without putting changes in the outbox, so handlers do not hear about the past."""
        ...

    async def ingest_raw(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
        decode_here: bool = False,
    ) -> RawIngestResult:
        """:meth:`ingest` from raw messages: decoding is part of the backend's work (a
        backend may do it off the caller's process). A message that does not decode is
        reported as :class:`Rejected` and does not fail its batch.

        ``decode_here``: the caller's process has a core to spare (a Kafka consumer, not
        an HTTP server): a backend that decodes and folds in another process does it in
        the caller's instead, and keeps the other for writing. Same result either way."""
        ...

    async def get_task(self, task_id: str) -> StoredTask | None: ...

    async def list_tasks(self, query: TaskQuery) -> TaskPage: ...

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

    async def stage_rebuilt(self, states: Mapping[str, TaskState]) -> None:
        """Keep rebuilt task states aside (not visible) until :meth:`swap_rebuilt`."""
        ...

    async def swap_rebuilt(self, upto_seq: int) -> int:
        """Atomically replace the view with the staged states, after folding into them the
        events that arrived past ``upto_seq`` meanwhile. Returns the view's task count."""
        ...

    async def discard_rebuilt(self) -> None: ...

    async def get_meta(self, key: str) -> str | None:
        """A small persistent key-value note (replay checkpoints and the like)."""
        ...

    async def set_meta(self, key: str, value: str | None) -> None:
        """Set or (``None``) delete a note."""
        ...

    async def task_changes(self, task_id: str) -> list[ChangeRecord]: ...

    async def changes_after(self, seq: int, limit: int = 500) -> list[ChangeRecord]:
        """Outbox entries with a larger ``seq``, in order."""
        ...

    async def changes_by_seq(self, seqs: Sequence[int]) -> list[ChangeRecord]: ...

    async def get_cursor(self, handler: str) -> int | None:
        """Every change up to this seq is resolved for ``handler`` (None: never started)."""
        ...

    async def set_cursor(self, handler: str, seq: int) -> None: ...

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

    async def acquire_lease(
        self, name: str, owner: str, ttl_ms: int, now_ms: int, *, take_from: str | None = None
    ) -> str:
        """Take or renew the named lease for ``owner`` until ``now_ms + ttl_ms`` when it is
        free, expired, already ``owner``'s, or held by ``take_from`` (a holder known dead).
        Returns the holder afterwards. Lets processes sharing a store agree on one
        dispatcher."""
        ...

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (a graceful stop)."""
        ...

    async def stats(self) -> StoreStats: ...
