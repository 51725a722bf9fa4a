"""The change type: a phase change as the outbox records it (:class:`ChangeRecord`) and
as a handler receives it (:class:`PhaseChange`). Pure: no I/O.

:meth:`PhaseChange.from_record` is the one place a stored change becomes what handlers
see: credentials hidden, the task typed. Live dispatch and replays both build it there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from consumer.core.model import Task
from consumer.core.secrets import redact

__all__ = ["ChangeKind", "ChangeRecord", "PhaseChange"]

ChangeKind = Literal["phase", "update"]


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


@dataclass(frozen=True, slots=True)
class PhaseChange:
    """What a handler receives.

    ``kind`` is ``"phase"`` when the materialized phase changed (``previous_phase`` ->
    ``phase``), ``"update"`` for any other change of the materialized task (progress,
    output...), delivered only to subscriptions that ask for updates.
    ``task`` is the materialized task right after the change, credentials hidden.
    ``changed_at`` is the snapshot's ``status.updatedAt`` (Unix ms); ``seq`` orders changes
    store-wide. ``attempt`` counts deliveries of this change to this handler (1 first).
    ``replay`` is True when the change is re-run by ``phasewatch replay handlers``.
    """

    task_id: str
    previous_phase: str | None
    phase: str
    task: Task
    event_id: str
    changed_at: int | float
    seq: int
    kind: ChangeKind = "phase"
    attempt: int = 1
    replay: bool = False

    @classmethod
    def from_record(
        cls, record: ChangeRecord, *, attempt: int = 1, replay: bool = False
    ) -> PhaseChange:
        """What a handler receives for ``record``: credentials hidden by rule, the task
        typed (a misshapen optional value reads as None; see :class:`~consumer.Task`)."""
        return cls(
            task_id=record.task_id,
            previous_phase=record.previous_phase,
            phase=record.phase,
            task=Task.model_validate(redact(record.task)),
            event_id=record.event_id,
            changed_at=record.changed_at,
            seq=record.seq,
            kind="update" if record.kind == "update" else "phase",
            attempt=attempt,
            replay=replay,
        )

    @classmethod
    def example(
        cls,
        task: Mapping[str, Any] | None = None,
        *,
        phase: str | None = None,
        previous_phase: str | None = None,
        kind: ChangeKind = "phase",
        seq: int = 1,
        event_id: str = "example-event",
        attempt: int = 1,
        replay: bool = False,
    ) -> PhaseChange:
        """A change as a handler would receive it, for the user's own tests::

            change = PhaseChange.example(
                {"type": "upload", "output": {...}}, phase="completed", previous_phase="running"
            )
            await publish(change)  # a handler decorated with @on(...)

        ``task`` is the task as Livepeer sends it (camelCase wire names); what it leaves
        out is filled in: ``id`` ``"example-task"``, ``status.updatedAt`` 0, and
        ``status.phase`` set to ``phase`` (default: the task's own, else ``completed``).
        It goes through :meth:`from_record` like a stored change, so credentials are
        hidden and the task validated exactly as the service would (a task the service
        would refuse raises pydantic's ValidationError here too).
        """
        doc = dict(task or {})
        doc.setdefault("id", "example-task")
        status = dict(doc.get("status") or {})
        if phase is None:
            phase = status.get("phase") or "completed"
        status["phase"] = phase
        status.setdefault("updatedAt", 0)
        doc["status"] = status
        record = ChangeRecord(
            seq=seq,
            task_id=str(doc["id"]),
            event_id=event_id,
            previous_phase=previous_phase,
            phase=phase,
            changed_at=status["updatedAt"],
            recorded_at=0,
            task=doc,
            kind=kind,
        )
        return cls.from_record(record, attempt=attempt, replay=replay)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description for notifications: the change and a task summary
        (id, type, phase, times, error, output asset ids), credentials already hidden."""
        task = self.task
        status = task.status
        return {
            "kind": self.kind,
            "seq": self.seq,
            "taskId": self.task_id,
            "previousPhase": self.previous_phase,
            "phase": self.phase,
            "changedAt": self.changed_at,
            "eventId": self.event_id,
            "replay": self.replay,
            "task": {
                "id": task.id,
                "type": task.type,
                "phase": status.phase,
                "updatedAt": status.updated_at,
                "progress": status.progress,
                "errorMessage": status.error_message,
                "retries": status.retries,
                "createdAt": task.created_at,
                "inputAssetId": task.input_asset_id,
                "outputAssetId": task.output_asset_id,
                "projectId": task.project_id,
            },
        }
