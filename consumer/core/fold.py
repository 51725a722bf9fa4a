"""The fold from task snapshots to the materialized task (spec §5). Pure: no I/O.

Snapshots of a task are ordered by ``(status.updatedAt, event createdAt, event id)``.
The materialized task is, for each top-level field, the value from the newest snapshot
that carries that field. Keeping, per field, the order key of the snapshot that supplied
it makes the fold a join (a per-field maximum): applying the same events in any order,
with any duplicates, yields the same task. That is what lets webhooks arrive shuffled and
Kafka redeliver after a crash without either changing the answer.

Batches are planned with this rule in :mod:`consumer.core.plan`. A phase change is
reported exactly when the materialized ``status.phase`` changes. Since
``status`` always travels whole (spec §4), an event older than the current status never
changes the phase and fires nothing; it may only fill a top-level field that no newer
snapshot carried (the ``scheduledAt`` quirk), which order independence requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consumer.core.codec import Event

__all__ = ["Key", "TaskState", "fold_into", "order_key"]

Key = tuple[int | float, int | float, str]
"""``(status.updatedAt, event createdAt, event id)``: total order of a task's snapshots."""


@dataclass(frozen=True, slots=True)
class TaskState:
    """A materialized task and, per top-level field, the key of the snapshot it came from."""

    task: dict[str, Any]
    keys: dict[str, Key]

    @property
    def task_id(self) -> str:
        return str(self.task["id"])

    @property
    def phase(self) -> str:
        return str(self.task["status"]["phase"])

    @property
    def updated_at(self) -> int | float:
        value: int | float = self.task["status"]["updatedAt"]
        return value

    @property
    def status_key(self) -> Key:
        return self.keys["status"]


def order_key(event: Event) -> Key:
    """The order key of a task event's snapshot."""
    updated_at = event.updated_at
    if updated_at is None:
        raise ValueError(f"event {event.id!r} ({event.kind}) carries no task snapshot")
    return (updated_at, event.created_at, event.id)


def fold_into(
    task: dict[str, Any], keys: dict[str, Key], snapshot: dict[str, Any], key: Key
) -> tuple[bool, bool]:
    """The fold's one rule, in place: each top-level field of ``snapshot`` replaces the
    task's unless the task's came from a snapshot ordered at or after ``key``.

    Returns ``(took, changed)``: whether any field was taken (its key at least is new),
    and whether any value differs. Same value under a newer key is still a new key to
    remember (the join must keep the maximum), but not a change anyone needs to hear
    about. In place because the batch planner (:mod:`consumer.core.plan`) folds many
    events into one working copy per task."""
    took = changed = False
    for field, value in snapshot.items():
        held = keys.get(field)
        if held is not None and held >= key:
            continue
        took = True
        if not changed and task.get(field, _MISSING) != value:
            changed = True
        task[field] = value
        keys[field] = key
    return took, changed


_MISSING = object()
