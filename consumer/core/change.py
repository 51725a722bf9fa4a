"""The change type: a phase change as the outbox records it (:class:`ChangeRecord`) and
as a handler receives it (:class:`PhaseChange`). Pure: no I/O.

:meth:`PhaseChange.from_record` is the one place a stored change becomes what handlers
see: credentials hidden, the task typed. Live dispatch and replays both build it there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from consumer.core.model import Task
from consumer.core.secrets import redact

__all__ = [
    "ChangeKind",
    "ChangeRecord",
    "PhaseChange",
    "idempotency_key",
    "stale_kind",
    "stale_threshold_ms",
]

ChangeKind = Literal["phase", "update", "stale"]
"""What a :class:`PhaseChange` is: ``"phase"`` (the phase moved), ``"update"`` (anything
else of the materialized task changed), ``"stale"`` (the task stayed in its phase, with
no newer snapshot, for as long as a subscription's ``stale_for``)."""

_STALE_PREFIX = "stale:"


def stale_kind(stale_for_ms: int) -> str:
    """The outbox kind (:attr:`ChangeRecord.kind`) of a stale alert recorded once a task
    stayed in its phase for ``stale_for_ms``: ``"stale:<ms>"``. The threshold is part of
    the kind so that a subscription waiting 900 s is not handed the alert recorded for
    one waiting 300 s; handlers see ``kind == "stale"``."""
    if isinstance(stale_for_ms, bool) or not isinstance(stale_for_ms, int) or stale_for_ms <= 0:
        raise ValueError(f"a stale threshold is a positive number of ms, not {stale_for_ms!r}")
    return f"{_STALE_PREFIX}{stale_for_ms}"


def stale_threshold_ms(kind: str) -> int | None:
    """The threshold (ms) of an outbox kind made by :func:`stale_kind`; None for any
    other kind (``"stale"`` alone included: a handler's view of one)."""
    if not kind.startswith(_STALE_PREFIX):
        return None
    digits = kind[len(_STALE_PREFIX) :]
    return int(digits) if digits.isdigit() else None


_KEY_PREFIX = "pw1_"
_KEY_HEX_CHARS = 32


def idempotency_key(
    *,
    handler: str,
    task_id: str,
    event_id: str,
    kind: str,
    previous_phase: str | None,
    phase: str,
    replay_run: str | None = None,
) -> str:
    """The :attr:`PhaseChange.idempotency_key` of one change for one handler.

    ``"pw1_"`` + the first 32 hex digits of SHA-256 over the fields in this order:
    handler, task id, event id, kind, previous phase, phase, replay run. Each field is
    length-prefixed (``<UTF-8 byte length>:<UTF-8 bytes>``), and a None (no previous
    phase; a live delivery's replay run) is ``-``, so no two different tuples of fields
    give the same input. Nothing else goes in: not the seq, the attempt, a time, the
    process or the host.
    """
    digest = hashlib.sha256()
    for value in (handler, task_id, event_id, kind, previous_phase, phase, replay_run):
        if value is None:
            digest.update(b"-")
        else:
            # surrogatepass: a lone surrogate in an id still gives a key, never an error.
            data = value.encode("utf-8", "surrogatepass")
            digest.update(b"%d:" % len(data))
            digest.update(data)
    return _KEY_PREFIX + digest.hexdigest()[:_KEY_HEX_CHARS]


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
    # "phase": the phase moved; "update": anything else changed; "stale:<ms>" (see
    # stale_kind): the task stayed in ``phase`` for that long after ``changed_at`` (its
    # status.updatedAt) with no newer snapshot. A stale alert's ``previous_phase`` is its
    # ``phase`` and its ``event_id`` the event whose snapshot has gone stale.
    kind: str = "phase"
    # The W3C trace context of the request that delivered the event that made the change.
    traceparent: str | None = None

    @property
    def task_type(self) -> str | None:
        value = self.task.get("type")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class PhaseChange:
    """What a handler receives.

    ``kind`` is ``"phase"`` when the materialized phase changed (``previous_phase`` ->
    ``phase``), ``"update"`` for any other change of the materialized task (progress,
    output...), delivered only to subscriptions that ask for updates, and ``"stale"``
    when the task has stayed in ``phase`` with no newer snapshot for the subscription's
    ``stale_for`` seconds after ``changed_at`` (delivered only to subscriptions with a
    ``stale_for`` for that phase, once per snapshot: a newer snapshot in the same phase
    starts a new wait; ``previous_phase`` is ``phase``).
    ``task`` is the materialized task right after the change, credentials hidden.
    ``changed_at`` is the snapshot's ``status.updatedAt`` (Unix ms); ``seq`` orders changes
    store-wide. ``attempt`` counts deliveries of this change to this handler (1 first).
    ``replay`` is True when the change is re-run by ``phasewatch replay handlers``.
    ``traceparent`` is the W3C trace context (``00-<trace id>-<parent id>-<flags>``) of
    the request that delivered the event that made the change, when it carried a valid
    one; None otherwise (Kafka, imports, an untraced sender). With tracing on
    (:mod:`consumer.tracing`), a handler gets instead the context of this delivery
    attempt's ``handler.deliver`` span, a child of the webhook's. It is not part of the
    idempotency key.

    ``idempotency_key`` (``pw1_`` and 32 hex digits, see :func:`idempotency_key`) names
    this change for this handler, for a receiver to deduplicate on. It is derived from
    the handler's name, ``task_id``, ``event_id``, ``kind``, ``previous_phase`` and
    ``phase`` only, so it is the same every time the change is delivered to the handler:
    on every attempt (retries, a re-driven dead letter), after a crash or restart
    redelivers it, on whichever replica (host, process) delivers it, and when the store
    is rebuilt from an export (the change then has another ``seq``; the key does not
    use it, nor any time). It differs for another handler (two handlers sending to one
    receiver never collide), for another change (any of those fields different), and
    for replays: each ``phasewatch replay handlers`` run has a run id of its own, kept
    when an interrupted run resumes, that goes into the key, so a replayed change never
    has the key of its live delivery nor of another run's, and is not dropped as a
    duplicate. Renaming a handler changes its keys.
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
    traceparent: str | None = None
    idempotency_key: str = field(kw_only=True)

    @classmethod
    def from_record(
        cls,
        record: ChangeRecord,
        *,
        handler: str,
        attempt: int = 1,
        replay_run: str | None = None,
    ) -> PhaseChange:
        """What handler ``handler`` (its subscription's name) receives for ``record``:
        credentials hidden by rule, the task typed (a misshapen optional value reads as
        None; see :class:`~consumer.Task`), and its idempotency key. ``replay_run``: the
        id of the ``replay handlers`` run re-running it (the change is then a replay);
        None for live delivery."""
        if not handler:
            raise ValueError("a change is built for a handler: its name must not be empty")
        if replay_run is not None and not replay_run:
            raise ValueError("a replay run id must not be empty")
        kind: ChangeKind = (
            "update"
            if record.kind == "update"
            else "stale"
            if record.kind.startswith("stale")
            else "phase"
        )
        return cls(
            task_id=record.task_id,
            previous_phase=record.previous_phase,
            phase=record.phase,
            task=Task.model_validate(redact(record.task)),
            event_id=record.event_id,
            changed_at=record.changed_at,
            seq=record.seq,
            kind=kind,
            attempt=attempt,
            replay=replay_run is not None,
            traceparent=record.traceparent,
            idempotency_key=idempotency_key(
                handler=handler,
                task_id=record.task_id,
                event_id=record.event_id,
                kind=kind,
                previous_phase=record.previous_phase,
                phase=record.phase,
                replay_run=replay_run,
            ),
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
        handler: str = "example-handler",
        replay_run: str = "example-replay",
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
        would refuse raises pydantic's ValidationError here too). Its
        ``idempotency_key`` is the one the service gives the change for a handler named
        ``handler`` (and, with ``replay=True``, in the replay run ``replay_run``).
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
        return cls.from_record(
            record, handler=handler, attempt=attempt, replay_run=replay_run if replay else None
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description for notifications: the change (with its
        ``idempotencyKey``) and a task summary (id, type, phase, times, error, output
        asset ids), credentials already hidden."""
        task = self.task
        status = task.status
        return {
            "idempotencyKey": self.idempotency_key,
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
