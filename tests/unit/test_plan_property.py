"""The one fold path (:func:`consumer.core.plan.plan_batch`) gives the same answer however
a delivery is cut into batches.

Live ingestion plans whole batches, rebuild folds a task's history as one batch and
replay as one ordered batch: for that to be one fold, any split of any permutation of a
task's events (with duplicates) must give the same final state and the same phase
changes, in the same order, as folding the events one by one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.codec import Event
from consumer.core.fold import TaskState
from consumer.core.plan import DedupKey, NewChange, Outcome, dedup_key, plan_batch
from tests.unit.test_fold import deliveries_of

Change = tuple[str | None, str, str]  # previous phase, phase, event id


def fold_in_batches(
    batches: Sequence[Sequence[Event]],
) -> tuple[TaskState | None, list[Change], list[Outcome]]:
    """Fold batch after batch the way a store does: what earlier batches stored is known
    to later ones (duplicates), and each batch starts from the state the last one left."""
    known: set[DedupKey] = set()
    states: dict[str, TaskState] = {}
    changes: list[NewChange] = []
    outcomes: list[Outcome] = []
    for batch in batches:
        plan = plan_batch(batch, [k for k in map(dedup_key, batch) if k in known], states)
        known.update(dedup_key(e) for e in plan.new_events)
        states.update(plan.states)
        changes.extend(plan.changes)
        outcomes.extend(plan.outcomes)
    state = next(iter(states.values()), None)
    return state, [(c.previous_phase, c.phase, c.event_id) for c in changes], outcomes


@st.composite
def split(draw: st.DrawFn, events: list[Event]) -> list[list[Event]]:
    """``events`` cut at random places into consecutive batches (some of one event)."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(events) - 1)), max_size=len(events))))
    bounds = [0, *[c for c in cuts if c < len(events)], len(events)]
    return [events[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=300)
@given(st.data())
def test_any_split_of_any_permutation_folds_like_one_by_one(data: st.DataObject) -> None:
    _, delivered = data.draw(deliveries_of())
    one_by_one = fold_in_batches([[e] for e in delivered])
    batches = data.draw(split(delivered))
    state, changes, outcomes = fold_in_batches(batches)
    expected_state, expected_changes, expected_outcomes = one_by_one
    assert state is not None and expected_state is not None
    assert state.task == expected_state.task
    assert state.keys == expected_state.keys
    assert changes == expected_changes
    assert outcomes == expected_outcomes  # the same events count as duplicates


@settings(max_examples=200)
@given(st.data())
def test_every_split_and_order_ends_in_the_same_task(data: st.DataObject) -> None:
    events, delivered = data.draw(deliveries_of())
    in_order, _, _ = fold_in_batches([events])
    shuffled, _, _ = fold_in_batches(data.draw(split(delivered)))
    assert in_order is not None and shuffled is not None
    assert shuffled.task == in_order.task and shuffled.keys == in_order.keys
