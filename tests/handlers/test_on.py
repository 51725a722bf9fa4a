"""The @on() decorator: filters as Subscription.matches sees them, and argument checks."""

from __future__ import annotations

import pytest

from consumer import Subscription
from handlers import Phase, PhaseChange, TaskType, on
from tests.handlers.support import make_change


async def _noop(change: PhaseChange) -> None:
    del change


def test_returns_a_subscription_named_module_qualname() -> None:
    @on()
    async def handler(change: PhaseChange) -> None:
        del change

    assert isinstance(handler, Subscription)
    qualname = "test_returns_a_subscription_named_module_qualname.<locals>.handler"
    assert handler.name == f"{__name__}:{qualname}"
    assert handler.fn.__name__ == "handler"
    assert on(name="billing")(_noop).name == "billing"
    assert on()(_noop).name == f"{__name__}:_noop"


def test_no_filter_matches_every_phase_change_but_no_update() -> None:
    sub = on()(_noop)
    assert sub.matches(make_change(phase="completed"))
    assert sub.matches(make_change(phase="pending", previous=None))
    assert not sub.matches(make_change(kind="update"))


@pytest.mark.parametrize(
    "phase", ["completed", Phase.COMPLETED, ["completed", "failed"], (Phase.COMPLETED,)]
)
def test_phase_filter(phase: str | list[str] | tuple[str, ...]) -> None:
    sub = on(phase)(_noop)
    assert "completed" in sub.phases
    assert all(type(p) is str for p in sub.phases)  # plain strings, not enum members
    assert sub.matches(make_change(phase="completed"))
    assert not sub.matches(make_change(phase="running"))


def test_previous_filter() -> None:
    any_previous = on(phase="running")(_noop)
    first_sight = on(phase="running", previous=None)(_noop)
    from_waiting = on(phase="running", previous=Phase.WAITING)(_noop)
    either = on(phase="running", previous=[None, "waiting"])(_noop)

    new = make_change(phase="running", previous=None)
    after_wait = make_change(phase="running", previous="waiting")
    after_pending = make_change(phase="running", previous="pending")
    assert [s.matches(new) for s in (any_previous, first_sight, from_waiting, either)] == [
        True,
        True,
        False,
        True,
    ]
    assert [s.matches(after_wait) for s in (any_previous, first_sight, from_waiting, either)] == [
        True,
        False,
        True,
        True,
    ]
    assert [s.matches(after_pending) for s in (first_sight, from_waiting, either)] == [
        False,
        False,
        False,
    ]


def test_type_filter() -> None:
    sub = on(type=[TaskType.UPLOAD, "transcode-file"])(_noop)
    assert sub.types == {"upload", "transcode-file"}
    assert sub.matches(make_change(task_type="upload"))
    assert sub.matches(make_change(task_type="transcode-file"))
    assert not sub.matches(make_change(task_type="clip"))


def test_where_predicate_runs_after_the_other_filters() -> None:
    seen: list[int] = []

    def odd(change: PhaseChange) -> bool:
        seen.append(change.seq)
        return change.seq % 2 == 1

    sub = on(phase="failed", where=odd)(_noop)
    assert sub.matches(make_change(seq=1, phase="failed"))
    assert not sub.matches(make_change(seq=2, phase="failed"))
    assert not sub.matches(make_change(seq=3, phase="completed"))
    assert seen == [1, 2]


def test_updates() -> None:
    update = make_change(kind="update", phase="running", previous="running")
    assert not on()(_noop).matches(update)
    assert on(updates=True)(_noop).matches(update)
    assert on(phase="running", updates=True)(_noop).matches(update)
    assert not on(phase="completed", updates=True)(_noop).matches(update)
    # The previous-phase filter is about phase changes; updates are not filtered by it.
    assert on(previous=None, updates=True)(_noop).matches(update)


def test_delivery_policy_is_carried() -> None:
    sub = on(
        concurrency=2, timeout_s=5, max_attempts=3, max_age_s=60, backoff_s=0.1, max_backoff_s=2
    )(_noop)
    assert (sub.concurrency, sub.timeout_s, sub.max_attempts) == (2, 5.0, 3)
    assert (sub.max_age_s, sub.backoff_s, sub.max_backoff_s) == (60.0, 0.1, 2.0)
    defaults = on()(_noop)
    assert (defaults.concurrency, defaults.timeout_s, defaults.max_attempts) == (8, 30.0, 8)
    assert (defaults.max_age_s, defaults.backoff_s) == (86400.0, 0.5)


def test_an_object_with_async_call_is_a_handler() -> None:
    class Counter:
        async def __call__(self, change: PhaseChange) -> None:
            del change

    sub = on(name="counter")(Counter())
    assert sub.name == "counter"


def test_rejects_a_sync_function() -> None:
    def sync(change: PhaseChange) -> None:
        del change

    with pytest.raises(TypeError, match=r"async function \(async def"):
        on()(sync)  # type: ignore[arg-type]


def test_rejects_on_without_parentheses() -> None:
    with pytest.raises(TypeError, match="with parentheses"):
        on(_noop)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"phase": 3}, TypeError, "phase"),
        ({"phase": ["completed", 3]}, TypeError, "phase"),
        ({"phase": " "}, ValueError, "empty"),
        ({"previous": [None, 1]}, TypeError, "previous"),
        ({"type": b"upload"}, TypeError, "type"),
        ({"where": "seq > 3"}, TypeError, "where"),
        ({"updates": "yes"}, TypeError, "updates"),
        ({"name": ""}, ValueError, "name"),
        ({"concurrency": 0}, ValueError, "concurrency"),
        ({"concurrency": True}, TypeError, "concurrency"),
        ({"max_attempts": 1.5}, TypeError, "max_attempts"),
        ({"timeout_s": 0}, ValueError, "timeout_s"),
        ({"timeout_s": float("inf")}, ValueError, "timeout_s"),
        ({"max_age_s": -1}, ValueError, "max_age_s"),
        ({"backoff_s": -0.1}, ValueError, "backoff_s"),
        ({"backoff_s": 10, "max_backoff_s": 1}, ValueError, "max_backoff_s"),
    ],
)
def test_rejects_bad_arguments_at_once(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        on(**kwargs)  # type: ignore[arg-type]


def test_rejects_an_async_predicate() -> None:
    async def predicate(change: PhaseChange) -> bool:
        del change
        return True

    with pytest.raises(TypeError, match="not async"):
        on(where=predicate)  # type: ignore[arg-type]


def test_unknown_names_are_kept_with_a_warning_at_the_call_site() -> None:
    with pytest.warns(UserWarning, match="'complete' is not a known phase") as record:
        sub = on(phase="complete")(_noop)
    assert record[0].filename == __file__
    assert sub.phases == {"complete"}
    with pytest.warns(UserWarning, match="not a known task type"):
        assert on(type="livestream")(_noop).types == {"livestream"}
