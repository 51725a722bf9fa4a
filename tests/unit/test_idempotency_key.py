"""PhaseChange.idempotency_key: the same for every delivery of one change to one handler
(attempts, a re-read record, any process), different for another handler, another
change, or a replay run."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import sys
from typing import Any

import pytest

from consumer.core.change import ChangeRecord, PhaseChange, idempotency_key
from consumer.core.times import now_ms
from consumer.dispatch.dispatcher import call_with_retries
from consumer.dispatch.subscription import Subscription
from consumer.store.base import DeliveryStatus
from tests.support import REPO

TASK: dict[str, Any] = {
    "id": "task-1",
    "type": "upload",
    "status": {"phase": "completed", "updatedAt": 1_700_000_001_000},
}
FIELDS: dict[str, Any] = {
    "task_id": "task-1",
    "event_id": "evt-1",
    "previous_phase": "running",
    "phase": "completed",
    "kind": "phase",
}
# The key of FIELDS for handler "h", live. Pinned: a key must never change across
# releases, processes or hosts, or receivers would take redeliveries for new changes.
PINNED = "pw1_d7dfdce8f34bf2288a63eeb06c3e721a"


def record(**overrides: Any) -> ChangeRecord:
    values: dict[str, Any] = {
        "seq": 7,
        "changed_at": 1_700_000_001_000,
        "recorded_at": 1_700_000_002_000,
        "task": TASK,
        **FIELDS,
        **overrides,
    }
    return ChangeRecord(**values)


def key(rec: ChangeRecord, handler: str = "h", replay_run: str | None = None) -> str:
    return PhaseChange.from_record(rec, handler=handler, replay_run=replay_run).idempotency_key


def documented(*fields: str | None) -> str:
    """The derivation as the docstring of idempotency_key states it."""
    data = b"".join(b"-" if f is None else b"%d:%s" % (len(f.encode()), f.encode()) for f in fields)
    return "pw1_" + hashlib.sha256(data).hexdigest()[:32]


def test_the_key_is_the_documented_hash_and_pinned() -> None:
    live = key(record())
    assert re.fullmatch(r"pw1_[0-9a-f]{32}", live)
    assert live == documented("h", "task-1", "evt-1", "phase", "running", "completed", None)
    assert live == PINNED
    replayed = key(record(), replay_run="run-1")
    assert replayed == documented("h", "task-1", "evt-1", "phase", "running", "completed", "run-1")
    first_sight = key(record(previous_phase=None))
    assert first_sight == documented("h", "task-1", "evt-1", "phase", None, "completed", None)


def test_the_key_does_not_depend_on_the_process() -> None:
    # Another interpreter (another pid, hash seed, start time): the same key.
    code = (
        "from consumer.core.change import idempotency_key as k;"
        "print(k(handler='h', task_id='task-1', event_id='evt-1', kind='phase',"
        " previous_phase='running', phase='completed'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == PINNED


def test_a_re_read_record_has_the_same_key() -> None:
    # A store rebuilt from an export gives the same change another seq and commit time.
    again = record(seq=90_001, recorded_at=1_800_000_000_000)
    assert key(again) == key(record()) == PINNED
    assert PhaseChange.from_record(again, handler="h") != PhaseChange.from_record(
        record(), handler="h"
    )


def test_every_attempt_has_the_same_key() -> None:
    first = PhaseChange.from_record(record(), handler="h")
    third = PhaseChange.from_record(record(), handler="h", attempt=3)
    assert first.idempotency_key == third.idempotency_key
    assert dataclasses.replace(first, attempt=2).idempotency_key == first.idempotency_key


async def test_the_retry_policy_keeps_the_key() -> None:
    seen: list[tuple[int, str]] = []

    async def call(change: PhaseChange) -> None:
        seen.append((change.attempt, change.idempotency_key))
        if len(seen) < 3:
            raise ConnectionError("receiver down")

    sub = Subscription(name="h", fn=call, backoff_s=0.001, max_backoff_s=0.001)
    change = PhaseChange.from_record(record(), handler="h")

    async def failed(attempt: int, error: str) -> None:
        del attempt, error

    status, attempts, _ = await call_with_retries(
        sub, change, call, first=now_ms(), on_failure=failed
    )
    assert (status, attempts) == (DeliveryStatus.DONE, 3)
    assert seen == [(1, PINNED), (2, PINNED), (3, PINNED)]


def test_handlers_replays_and_live_differ() -> None:
    rec = record()
    live_h, live_g = key(rec, "h"), key(rec, "g")
    run_1, run_2 = key(rec, "h", "run-1"), key(rec, "h", "run-2")
    assert len({live_h, live_g, run_1, run_2, key(rec, "g", "run-1")}) == 5
    # Built the same way twice: equal (a retry within a replay run keeps its key).
    assert key(rec, "h", "run-1") == run_1
    replay = PhaseChange.from_record(rec, handler="h", replay_run="run-1")
    assert replay.replay and not PhaseChange.from_record(rec, handler="h").replay


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_id", "task-2"),
        ("event_id", "evt-2"),
        ("previous_phase", None),
        ("previous_phase", ""),
        ("previous_phase", "waiting"),
        ("phase", "failed"),
        ("kind", "update"),
    ],
)
def test_any_identity_field_changes_the_key(field: str, value: str | None) -> None:
    assert key(record(**{field: value})) != key(record())


def test_fields_cannot_run_into_each_other() -> None:
    # Without a length prefix, "ab"+"c" and "a"+"bc" would hash the same bytes.
    base: dict[str, Any] = {"kind": "phase", "previous_phase": None, "phase": "completed"}
    one = idempotency_key(handler="h", task_id="ab", event_id="c", **base)
    two = idempotency_key(handler="h", task_id="a", event_id="bc", **base)
    three = idempotency_key(handler="ha", task_id="b", event_id="c", **base)
    assert len({one, two, three}) == 3
    # A None is not the string "-" or the empty string.
    dash = {**base, "previous_phase": "-"}
    empty = {**base, "previous_phase": ""}
    assert (
        len(
            {
                idempotency_key(handler="h", task_id="t", event_id="e", **base),
                idempotency_key(handler="h", task_id="t", event_id="e", **dash),
                idempotency_key(handler="h", task_id="t", event_id="e", **empty),
            }
        )
        == 3
    )


def test_odd_ids_still_give_a_key() -> None:
    assert key(record(task_id="t\ud800", event_id="é:\x00")).startswith("pw1_")


def test_a_handler_and_a_replay_run_are_required() -> None:
    with pytest.raises(ValueError, match="handler"):
        PhaseChange.from_record(record(), handler="")
    with pytest.raises(ValueError, match="replay run"):
        PhaseChange.from_record(record(), handler="h", replay_run="")


def test_example_has_the_key_the_service_would_give() -> None:
    example = PhaseChange.example(TASK, previous_phase="running", event_id="evt-1")
    assert example.idempotency_key == key(record(), "example-handler")
    named = PhaseChange.example(TASK, previous_phase="running", event_id="evt-1", handler="h")
    assert named.idempotency_key == PINNED
    replayed = PhaseChange.example(TASK, event_id="evt-1", replay=True, replay_run="r", handler="h")
    assert replayed.replay
    assert replayed.idempotency_key == key(record(previous_phase=None), "h", "r")
    assert example.summary()["idempotencyKey"] == example.idempotency_key
