"""Planning a batch: the one fold path. Pure: no I/O.

Live ingestion (every backend), rebuild and replay all fold through :func:`plan_batch`:
given a batch of events, the dedup keys already stored among them and the current state
of the tasks they touch, it decides which events are duplicates, the new state of each
task, and which phase changes to record. So SQLite, PostgreSQL, the in-memory fake, the
rebuild and ``replay handlers`` cannot drift apart. :func:`apply` is the same fold for
one event, for tests and callers that think in single steps.

Because the per-field rule (:func:`~consumer.core.fold.fold_into`) is a join, any split
of any permutation of a task's events into batches gives the same final state, and
within each order the same phase changes as folding the events one by one (a property
test holds this).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from consumer.core.change import ChangeRecord
from consumer.core.codec import Event
from consumer.core.fold import Key, TaskState, fold_into, order_key

__all__ = [
    "Applied",
    "BatchPlan",
    "DedupKey",
    "NewChange",
    "Outcome",
    "Transition",
    "apply",
    "decode_keys",
    "dedup_key",
    "encode_keys",
    "plan_batch",
]


class Outcome(StrEnum):
    ACCEPTED = "accepted"  # new event, now in the history (and folded, if a task event)
    DUPLICATE = "duplicate"  # event id already in the history: nothing done


@dataclass(slots=True)
class NewChange:
    """A phase change computed by :func:`plan_batch`, not yet given an outbox sequence.
    Not frozen, for the same reason as :class:`~consumer.core.codec.Event`."""

    task_id: str
    event_id: str
    previous_phase: str | None
    phase: str
    changed_at: int | float  # status.updatedAt of the snapshot that moved the phase
    task: dict[str, Any]  # the materialized task right after the change
    kind: str = "phase"  # "phase", or "update" (recorded only when asked for)
    traceparent: str | None = None  # the causing event's receipt's, kept with the change

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
            self.traceparent,
        )


@dataclass(slots=True)
class BatchPlan:
    """What one batch does to a store; backends write it in one transaction."""

    outcomes: list[Outcome] = field(default_factory=list)
    new_events: list[Event] = field(default_factory=list)
    states: dict[str, TaskState] = field(default_factory=dict)  # tasks to write
    versions_bumped: set[str] = field(default_factory=set)  # tasks whose materialized value changed
    changes: list[NewChange] = field(default_factory=list)


DedupKey = tuple[str | None, str]
"""What the history deduplicates on: ``(task id, event id)``; task id None for non-task
events. An event id is unique per event in Livepeer's feeds, so this is event-id dedup;
scoping it by task lets a backend keep the check next to the task's other events (recent
tasks cluster together), instead of in one index of random ids that every batch dirties
all over."""


def dedup_key(event: Event) -> DedupKey:
    """The deduplication key of ``event`` (see :data:`DedupKey`)."""
    return (event.task_id, event.id)


def plan_batch(
    events: Sequence[Event],
    known: Iterable[DedupKey],
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
        order = order_key(event)
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
    receipt = event.receipt
    return NewChange(
        str(event.task_id),
        event.id,
        previous,
        state.phase,
        state.updated_at,
        task,
        kind,
        None if receipt is None else receipt.traceparent,
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


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of the materialized phase. ``previous`` is None on first sight."""

    previous: str | None
    phase: str


@dataclass(frozen=True, slots=True)
class Applied:
    """What folding one event did. ``changed``: the materialized task is different
    (progress, output, a filled field...); ``transition``: set when the phase changed."""

    state: TaskState
    changed: bool
    transition: Transition | None


def apply(state: TaskState | None, event: Event) -> Applied:
    """Fold one task event into ``state`` (None for a task not seen yet): a batch of one
    through :func:`plan_batch`. ``state`` is never mutated."""
    task_id = event.task_id
    if task_id is None or event.snapshot is None:
        raise ValueError(f"event {event.id!r} ({event.kind}) carries no task snapshot")
    plan = plan_batch([event], (), {} if state is None else {task_id: state})
    after = plan.states.get(task_id, state)
    assert after is not None  # a task event always leaves a state
    moved = plan.changes[0] if plan.changes else None
    transition = None if moved is None else Transition(moved.previous_phase, moved.phase)
    return Applied(after, task_id in plan.versions_bumped, transition)
