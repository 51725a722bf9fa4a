"""Users test their own handlers: what ``@on`` returns can be awaited like the function it
wraps, and ``PhaseChange.example`` builds the change the service would deliver (same
redaction, same validation), without a store or a dispatcher."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from consumer.core.change import ChangeRecord
from handlers import PermanentError, Phase, PhaseChange, Subscription, on
from tests.handlers.support import assert_no_credentials, credentialed_task

UPLOADED = {
    "type": "upload",
    "output": {"upload": {"assetSpec": {"id": "asset-1", "playbackId": "pb-1"}}},
}


async def test_a_decorated_handler_can_be_awaited_directly() -> None:
    seen: list[PhaseChange] = []

    @on(phase=Phase.COMPLETED, type="upload")
    async def publish(change: PhaseChange) -> None:
        seen.append(change)

    assert isinstance(publish, Subscription)
    change = PhaseChange.example(UPLOADED, phase="completed", previous_phase="running")
    assert publish.matches(change)
    await publish(change)
    assert seen == [change]


async def test_the_readme_handler_reads_the_example() -> None:
    played: list[str | None] = []

    @on(phase=Phase.COMPLETED, type="upload")
    async def publish(change: PhaseChange) -> None:
        output = change.task.output
        asset = output.upload.asset_spec if output and output.upload else None
        played.append(asset.playback_id if asset else None)

    await publish(PhaseChange.example(UPLOADED, phase="completed"))
    await publish(PhaseChange.example({"type": "upload"}, phase="completed"))
    assert played == ["pb-1", None]


async def test_errors_reach_the_caller() -> None:
    @on(phase="failed")
    async def page(change: PhaseChange) -> None:
        if not change.task.status.error_message:
            raise PermanentError("nothing to page about")

    with pytest.raises(PermanentError, match="nothing to page about"):
        await page(PhaseChange.example(phase="failed", previous_phase="running"))


def test_example_is_what_from_record_delivers() -> None:
    task = credentialed_task("task-9", phase="failed")
    example = PhaseChange.example(task, previous_phase="running", seq=5, event_id="evt-5")
    record = ChangeRecord(
        seq=5,
        task_id="task-9",
        event_id="evt-5",
        previous_phase="running",
        phase="failed",
        changed_at=task["status"]["updatedAt"],
        recorded_at=0,
        task=task,
    )
    assert example == PhaseChange.from_record(record, handler="example-handler")
    # Credentials are hidden as in a delivered change, whatever the test passed in.
    assert_no_credentials(repr(example))
    assert task["params"]["upload"]["encryption"]["encryptedKey"] == "ENCKEY-s3cr3t"


def test_example_fills_what_the_test_leaves_out() -> None:
    change = PhaseChange.example()
    assert (change.task_id, change.phase, change.previous_phase) == (
        "example-task",
        "completed",
        None,
    )
    assert change.task.status.phase == Phase.COMPLETED
    assert (change.kind, change.attempt, change.replay) == ("phase", 1, False)
    update = PhaseChange.example({"status": {"phase": "running", "updatedAt": 9}}, kind="update")
    assert (update.phase, update.changed_at, update.kind) == ("running", 9, "update")


def test_example_validates_like_the_service() -> None:
    with pytest.raises(ValidationError, match="updatedAt"):
        PhaseChange.example({"status": {"updatedAt": "yesterday"}})
