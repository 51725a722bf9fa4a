"""The Task model's types tell the truth: a typed attribute holds a value of its type or
None, never a misshapen value received in its place; that value still round-trips through
``wire()`` and is readable with ``raw()``. And a key spelled like a Python attribute
(``encrypted_key``) never fills the typed attribute that redaction knows by its wire name.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from consumer.core.model import Task
from handlers import PhaseChange

# Every JSON value, any shape.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=6)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """An object with some of ``fields`` (each well-shaped or not), or any JSON value."""
    return json_values | st.fixed_dictionaries({}, optional=fields)


asset = shaped(
    {
        "id": json_values,
        "playbackId": json_values,
        "size": json_values,
        "staticMp4": json_values,
        "status": shaped({"phase": json_values, "progress": json_values}),
        "videoSpec": shaped({"duration": json_values, "tracks": json_values}),
    }
)
tasks = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=8),
        "status": st.fixed_dictionaries(
            {
                "phase": st.sampled_from(["running", "completed"]),
                "updatedAt": st.integers(0, 2**45),
            },
            optional={"progress": json_values, "retries": json_values, "errorMessage": json_values},
        ),
    },
    optional={
        "type": json_values,
        "createdAt": json_values,
        "deleted": json_values,
        "output": shaped(
            {
                "upload": shaped({"videoFilePath": json_values, "assetSpec": asset}),
                "clip": shaped({"assetSpec": asset}),
                "transcodeFile": shaped({"baseUrl": json_values, "mp4": json_values}),
            }
        ),
        "params": shaped(
            {
                "upload": shaped(
                    {"url": json_values, "encryption": json_values, "profiles": json_values}
                )
            }
        ),
    },
)


def ill_typed(model: BaseModel, path: str = "task") -> list[str]:
    """Every attribute of ``model`` and its sub-models holding a value its annotation
    does not admit, checked strictly (no coercion: "5" is not a number)."""
    wrong = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        assert info.annotation is not None
        try:
            TypeAdapter(info.annotation).validate_python(value, strict=True)
        except ValidationError:
            wrong.append(f"{path}.{name} = {value!r}")
        children = value if isinstance(value, list) else [value]
        for index, child in enumerate(children):
            if isinstance(child, BaseModel):
                wrong += ill_typed(child, f"{path}.{name}[{index}]")
    return wrong


@given(tasks)
def test_typed_attributes_hold_their_type_and_the_wire_is_kept(doc: dict[str, Any]) -> None:
    task = Task.model_validate(doc)
    assert ill_typed(task) == []
    assert task.wire() == doc
    for key, value in doc.items():
        assert task.raw(key) == value


def test_a_misshapen_value_reads_none_and_stays_on_the_wire() -> None:
    doc = {
        "id": "T1",
        "status": {"phase": "completed", "updatedAt": 5, "progress": "number"},
        "output": {"upload": "s3://bucket/out", "clip": {"assetSpec": {"playbackId": 7}}},
    }
    task = Task.model_validate(doc)
    assert task.output is not None
    assert task.output.upload is None
    assert task.output.raw("upload") == "s3://bucket/out"
    assert task.status.progress is None and task.status.raw("progress") == "number"
    assert task.output.clip is not None and task.output.clip.asset_spec is not None
    assert task.output.clip.asset_spec.playback_id is None
    assert task.output.clip.asset_spec.raw("playbackId") == 7
    assert task.output.clip.asset_spec.raw("playback_id") == 7  # the attribute name works too
    assert task.raw("missing") is None
    assert task.wire() == doc
    # Dumped by attribute name, the value comes back as received as well.
    assert task.output.model_dump(exclude_unset=True)["upload"] == "s3://bucket/out"


async def test_the_readme_example_does_not_raise_on_a_misshapen_output() -> None:
    # The README's handler body, on a task whose output.upload is not an object.
    change = PhaseChange.example(
        {"type": "upload", "output": {"upload": "not-an-object"}}, phase="completed"
    )
    output = change.task.output
    asset = output.upload.asset_spec if output and output.upload else None
    assert asset is None


@pytest.mark.parametrize(
    ("doc", "read"),
    [
        (
            {"params": {"upload": {"encryption": {"encrypted_key": "KEY-s3cr3t"}}}},
            lambda t: t.params.upload.encryption.encrypted_key,
        ),
        (
            {"params": {"export": {"ipfs": {"pinata": {"api_secret": "PIN-s3cr3t"}}}}},
            lambda t: t.params.export.ipfs.pinata.api_secret,
        ),
        ({"input_asset_id": "asset-x"}, lambda t: t.input_asset_id),
    ],
)
def test_attribute_spelled_keys_do_not_fill_typed_attributes(
    doc: dict[str, Any], read: Any
) -> None:
    full = {"id": "T", "status": {"phase": "running", "updatedAt": 1}, **doc}
    task = Task.model_validate(full)
    assert read(task) is None
    assert task.wire() == full  # kept as an unknown field, as received


def test_snake_case_cannot_stand_in_for_a_required_wire_name() -> None:
    with pytest.raises(ValidationError, match="updatedAt"):
        Task.model_validate({"id": "T", "status": {"phase": "running", "updated_at": 1}})
