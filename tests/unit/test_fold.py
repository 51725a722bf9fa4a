"""The fold (spec §5): order-independent, idempotent, and loud exactly when the phase moves.

Lifecycles are generated the way Livepeer's scheduler moves phases (spec §4), including
retries whose snapshots lack ``scheduledAt``, partial results, manual retries and
timestamp ties; then delivered in every order hypothesis can think of, with duplicates.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.codec import Event, decode
from consumer.core.fold import TaskState, order_key
from consumer.core.plan import apply
from tests.support import deliveries, expected_changes, expected_tasks, webhook_body


@st.composite
def lifecycles(draw: st.DrawFn, task_id: str = "T") -> list[Event]:
    """Events of one task in emission order, following spec §4."""
    t = draw(st.integers(1_750_000_000_000, 1_760_000_000_000))
    base: dict[str, Any] = {
        "id": task_id,
        "type": draw(st.sampled_from(["upload", "clip", "?"])),
        "createdAt": t,
        "userId": "u",
    }
    snaps: list[dict[str, Any]] = [{**base, "status": {"phase": "pending", "updatedAt": t}}]
    retries = 0
    scheduled: int | None = None
    for _ in range(draw(st.integers(0, 12))):
        # Ties are allowed: two snapshots may share updatedAt (then createdAt/id decide).
        t += draw(st.sampled_from([0, 1, 250, 10_000]))
        phase = snaps[-1]["status"]["phase"]
        step = draw(st.sampled_from(["advance", "progress", "partial", "retry", "fail", "done"]))
        snap: dict[str, Any] = dict(base)
        if scheduled is not None:
            snap["scheduledAt"] = scheduled
        if phase == "pending" or (phase in ("failed", "cancelled") and step == "retry"):
            scheduled = t
            retries = 0
            snap.update(scheduledAt=t, status={"phase": "waiting", "updatedAt": t, "retries": 0})
        elif step in ("advance", "progress", "partial") and phase in ("waiting", "running"):
            snap["status"] = {
                "phase": "running",
                "updatedAt": t,
                "retries": retries,
                "progress": draw(st.sampled_from([0.25, 0.5, 0.75])),
            }
            if step == "partial":
                snap["output"] = {"upload": {"videoFilePath": f"v{t}"}}
        elif step == "retry" and phase == "running" and retries < 2:
            retries += 1
            snap["status"] = {
                "phase": "waiting",
                "updatedAt": t,
                "retries": retries,
                "errorMessage": "boom",
            }
            snaps.append(snap)
            t += 1
            snap = dict(base)  # the second retry snapshot LACKS scheduledAt
            snap["status"] = {"phase": "waiting", "updatedAt": t, "retries": retries}
        elif step == "fail" and phase in ("waiting", "running"):
            snap["status"] = {
                "phase": "failed",
                "updatedAt": t,
                "retries": retries,
                "errorMessage": "unretriable",
            }
        elif step == "done" and phase == "running":
            snap["status"] = {"phase": "completed", "updatedAt": t}
            snap["output"] = {"upload": {"videoFilePath": "final", "assetSpec": {"id": "A"}}}
        else:
            continue
        snaps.append(snap)
    events = []
    for i, snap in enumerate(snaps):
        created = snap["status"]["updatedAt"] + draw(st.integers(0, 3))
        events.append(decode(webhook_body(f"{task_id}-e{i:02d}", snap, created_at=created)))
        if snap["status"]["phase"] in ("completed", "failed") and draw(st.booleans()):
            # task.completed / task.failed: same snapshot, another event id.
            kind = "task.completed" if snap["status"]["phase"] == "completed" else "task.failed"
            events.append(
                decode(webhook_body(f"{task_id}-e{i:02d}c", snap, event=kind, created_at=created))
            )
    return events


def by_definition(events: list[Event]) -> dict[str, Any]:
    """Spec §5 read literally: per field, the value from the newest snapshot carrying it."""
    task: dict[str, Any] = {}
    for event in sorted(events, key=order_key):
        assert event.snapshot is not None
        task.update(event.snapshot)
    return task


def fold(
    events: list[Event], state: TaskState | None = None
) -> tuple[TaskState | None, list[tuple[str | None, str]]]:
    transitions = []
    for event in events:
        applied = apply(state, event)
        state = applied.state
        if applied.transition:
            transitions.append((applied.transition.previous, applied.transition.phase))
    return state, transitions


@st.composite
def deliveries_of(draw: st.DrawFn) -> tuple[list[Event], list[Event]]:
    """A lifecycle and an arbitrary delivery of it: shuffled, with duplicates."""
    events = draw(lifecycles())
    extra = draw(st.lists(st.sampled_from(events), max_size=len(events)))
    delivered = draw(st.permutations(events + extra))
    return events, delivered


@settings(max_examples=300)
@given(deliveries_of())
def test_any_order_any_duplicates_same_task(case: tuple[list[Event], list[Event]]) -> None:
    events, delivered = case
    state, _ = fold(delivered)
    assert state is not None
    assert state.task == by_definition(events)


@settings(max_examples=300)
@given(deliveries_of())
def test_phase_change_reported_exactly_when_materialized_phase_changes(
    case: tuple[list[Event], list[Event]],
) -> None:
    _, delivered = case
    state: TaskState | None = None
    newest: Event | None = None
    for event in delivered:
        before = None if state is None else state.phase
        applied = apply(state, event)
        state = applied.state
        if newest is None or order_key(event) > order_key(newest):
            newest = event
        assert state.phase == newest.phase  # the phase is that of the newest snapshot
        if before != state.phase:
            assert applied.transition is not None
            assert (applied.transition.previous, applied.transition.phase) == (before, state.phase)
        else:
            assert applied.transition is None


@given(deliveries_of())
def test_applying_again_changes_nothing(case: tuple[list[Event], list[Event]]) -> None:
    _, delivered = case
    state, _ = fold(delivered)
    for event in delivered:
        applied = apply(state, event)
        assert applied.state is state and not applied.changed and applied.transition is None


@given(deliveries_of())
def test_an_older_event_never_moves_the_phase_or_fires(
    case: tuple[list[Event], list[Event]],
) -> None:
    events, _ = case
    newest = max(events, key=order_key)
    state, _ = fold([newest])
    for event in events:
        if order_key(event) < order_key(newest):
            applied = apply(state, event)
            assert applied.transition is None
            assert applied.state.task["status"] == newest.snapshot["status"]  # type: ignore[index]
            state = applied.state


def test_older_snapshot_fills_a_field_newer_ones_lack() -> None:
    """The scheduledAt quirk: the merged task keeps it whatever the arrival order."""
    with_sched = {"id": "T", "scheduledAt": 7, "status": {"phase": "waiting", "updatedAt": 10}}
    without = {"id": "T", "status": {"phase": "waiting", "updatedAt": 20, "retries": 1}}
    a = decode(webhook_body("a", with_sched))
    b = decode(webhook_body("b", without))
    for order in ([a, b], [b, a]):
        state, transitions = fold(order)
        assert state is not None
        assert state.task == {"id": "T", "scheduledAt": 7, "status": without["status"]}
        assert transitions == [(None, "waiting")]


@pytest.mark.parametrize("fixture", ["small", "messy"])
def test_fixtures_fold_to_expected_tasks(fixture: str) -> None:
    events = [decode(d.body) for d in deliveries(fixture)]
    states: dict[str, TaskState] = {}
    for event in events:
        assert event.task_id is not None
        states[event.task_id] = apply(states.get(event.task_id), event).state
    assert {k: s.task for k, s in states.items()} == expected_tasks(fixture)


def test_small_in_updated_order_gives_expected_phase_changes() -> None:
    events = sorted((decode(d.body) for d in deliveries("small")), key=order_key)
    states: dict[str, TaskState] = {}
    seen: dict[str, list[list[str | None]]] = {}
    for event in events:
        assert event.task_id is not None
        applied = apply(states.get(event.task_id), event)
        states[event.task_id] = applied.state
        if applied.transition:
            seen.setdefault(event.task_id, []).append(
                [applied.transition.previous, applied.transition.phase]
            )
    assert seen == expected_changes("small")


def test_apply_rejects_non_task_events() -> None:
    import orjson

    event = decode(orjson.dumps({"id": "e", "createdAt": 1, "event": "asset.ready", "payload": {}}))
    with pytest.raises(ValueError, match="no task snapshot"):
        apply(None, event)
