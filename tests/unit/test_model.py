"""The Task model: faithful round-trips, liberal where Livepeer is messy, strict where an
event would be unusable."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from consumer.core.codec import InvalidEvent, decode
from consumer.core.model import Phase, Task, TranscodeProfile
from tests.support import SHARED, deliveries, expected_tasks, webhook_body


def seed_example() -> dict[str, Any]:
    text = (SHARED / "seed" / "tasks-api-overview.md").read_text()
    match = re.search(r"```json[^\n]*\n(.*?)```", text, re.S)
    assert match, "seed page has no JSON example"
    doc: dict[str, Any] = orjson.loads(match.group(1))
    return doc


def test_seed_example_round_trips_unchanged() -> None:
    doc = seed_example()
    task = Task.model_validate(doc)
    assert task.wire() == doc
    # Documentation placeholders ("number") are not rejected: the typed attribute reads
    # None, and the placeholder is kept for the round-trip.
    assert task.status.progress is None and task.status.raw("progress") == "number"
    # The doc page puts clip at the top level; it is found there.
    assert (
        task.clip_params is not None and task.clip_params.catalyst_pipeline_strategy == "catalyst"
    )


@pytest.mark.parametrize("fixture", ["small", "messy"])
def test_every_fixture_snapshot_round_trips(fixture: str) -> None:
    for delivery in deliveries(fixture):
        snapshot = delivery.doc["payload"]["task"]["snapshot"]
        assert Task.model_validate(snapshot).wire() == snapshot
    for task in expected_tasks(fixture).values():
        assert Task.model_validate(task).wire() == task


def test_typed_access_to_nested_shapes() -> None:
    task = Task.model_validate(seed_example())
    assert task.params is not None and task.params.transcode_file is not None
    assert task.params.transcode_file.storage is not None
    assert (
        task.params.transcode_file.storage.url
        == "s3+https://accessKeyId:secretAccessKey@s3Endpoint/bucket"
    )
    assert task.output is not None and task.output.upload is not None
    spec = task.output.upload.asset_spec
    assert spec is not None and spec.video_spec is not None and spec.video_spec.tracks is not None
    assert spec.video_spec.tracks[1].sample_rate == 44100
    assert isinstance(task.params.transcode_file.profiles, list)
    assert isinstance(task.params.transcode_file.profiles[0], TranscodeProfile)


def test_unknown_fields_and_enum_values_are_kept() -> None:
    doc = {
        "id": "T1",
        "type": "teleport",
        "brandNewField": {"nested": [1, 2]},
        "params": {"upload": {"url": "https://x", "futureKnob": True}},
        "status": {"phase": "hibernating", "updatedAt": 5, "step": "x", "eta": 9},
    }
    task = Task.model_validate(doc)
    assert task.type == "teleport"
    assert task.phase == "hibernating"
    assert task.wire() == doc


def test_known_phase_compares_as_enum() -> None:
    task = Task.model_validate({"id": "T", "status": {"phase": "completed", "updatedAt": 1}})
    assert task.status.phase == Phase.COMPLETED


@pytest.mark.parametrize(
    ("doc", "complaint"),
    [
        ({"status": {"phase": "running", "updatedAt": 1}}, "id"),
        ({"id": "", "status": {"phase": "running", "updatedAt": 1}}, "id"),
        ({"id": "T", "status": {"updatedAt": 1}}, "phase"),
        ({"id": "T", "status": {"phase": "running", "updatedAt": "yesterday"}}, "updated"),
        ({"id": "T", "status": {"phase": "running", "updatedAt": True}}, "updated"),
        ({"id": "T"}, "status"),
    ],
)
def test_strict_only_where_the_event_is_unusable(doc: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError) as info:
        Task.model_validate(doc)
    assert complaint in str(info.value).lower()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
task_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values | st.text(min_size=1, max_size=10),
        "type": json_values,
        "params": json_values | st.fixed_dictionaries({"upload": json_values}),
        "output": json_values,
        "scheduledAt": json_values,
        "status": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "phase": json_values | st.sampled_from(["running", "completed"]),
                "updatedAt": json_values | st.integers(0, 2**45),
                "progress": json_values,
            },
        ),
    },
)


@given(task_like)
def test_codec_accepts_exactly_what_the_model_accepts(doc: dict[str, Any]) -> None:
    """The codec's fast checks and the model's strictness must never disagree."""
    try:
        task = Task.model_validate(doc)
        model_ok = True
    except ValidationError:
        model_ok = False
    body = webhook_body("evt-1", doc, created_at=1) if "id" in doc else None
    if body is None:
        assert not model_ok
        return
    try:
        decode(body)
        codec_ok = True
    except InvalidEvent:
        codec_ok = False
    assert codec_ok == model_ok
    if model_ok:
        assert task.wire() == doc
