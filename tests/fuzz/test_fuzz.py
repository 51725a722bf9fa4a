"""The fuzz tier, bounded in time: hypothesis mutates real deliveries (the fixtures') and
drives them through the codec and through the HTTP receiver. A 5xx, or any error that is
not one of the codec's typed ones, fails the build.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.core.change import ChangeRecord, PhaseChange
from consumer.core.codec import DecodeError, decode
from tests.http.conftest import PATH, MakeClient
from tests.support import deliveries

pytestmark = pytest.mark.fuzz

BODIES = [d.body for d in deliveries("messy")[:300]]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["", "running", "completed", "task.updated", "\u0000", "\ud7ff", "é"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found.extend(_paths(value, (*prefix, index)))
    return found


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy: Any = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[head] = _replace(copy[head], rest, value)
    return copy


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real delivery, changed in one of the ways a hostile or broken sender would."""
    body = draw(st.sampled_from(BODIES))
    how = draw(st.sampled_from(["value", "drop", "bytes", "truncate", "deep", "splice"]))
    if how in ("value", "drop", "deep"):
        doc = orjson.loads(body)
        path = draw(st.sampled_from(_paths(doc)))
        if how == "drop" and path:
            parent = _paths(doc) and path[:-1]
            holder: Any = doc
            for key in parent:
                holder = holder[key]
            del holder[path[-1]]
            return orjson.dumps(doc)
        marker = "__fuzz__"
        doc = _replace(doc, path, marker)
        if how == "deep":
            levels = draw(st.integers(100, 400))
            inner = b"[" * levels + b"1" + b"]" * levels
        else:
            try:
                inner = orjson.dumps(draw(_values))
            except TypeError:  # an integer orjson will not write: senders can
                inner = str(draw(st.integers(2**64, 2**80))).encode()
        return orjson.dumps(doc).replace(orjson.dumps(marker), inner)
    if how == "truncate":
        return body[: draw(st.integers(0, len(body)))]
    if how == "splice":
        other = draw(st.sampled_from(BODIES))
        cut = draw(st.integers(0, len(body)))
        return body[:cut] + other[draw(st.integers(0, len(other))) :]
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=600, deadline=None)
@given(mutated())
def test_the_codec_answers_with_an_event_or_a_typed_error(body: bytes) -> None:
    try:
        event = decode(body)
    except DecodeError:
        return
    if event.snapshot is None:
        return
    # What decodes must be what the fold, the store and handlers can use: the model the
    # dispatcher builds for a change validates, and the snapshot encodes back.
    orjson.dumps(event.snapshot)
    record = ChangeRecord(
        1, str(event.task_id), event.id, None, str(event.phase), 1, 1, event.snapshot
    )
    PhaseChange.from_record(record, handler="fuzz")


def _task_id(body: bytes, headers: dict[str, str]) -> Any:
    """The task an accepted webhook named, to read it back."""
    if headers.get("Content-Encoding") == "deflate":
        body = zlib.decompress(body)
    doc = orjson.loads(body)
    payload = doc.get("payload")
    task = payload.get("task") if isinstance(payload, dict) else None
    return task.get("id") if isinstance(task, dict) else None


_clients: dict[int, TestClient[Any, Any]] = {}


async def _client(make_client: MakeClient) -> TestClient[Any, Any]:
    """One service per test, shared by its examples (a service per example would open
    hundreds of stores)."""
    key = id(make_client)
    if key not in _clients:
        _clients[key] = (await make_client(webhook_secret=None))[0]
    return _clients[key]


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    body = draw(mutated())
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "text/plain", ""]))}
    encoding = draw(st.sampled_from([None, "deflate", "gzip", "identity", "br", "bogus"]))
    if encoding is not None:
        headers["Content-Encoding"] = encoding
        if encoding == "deflate" and draw(st.booleans()):
            body = zlib.compress(body)
    return body, headers


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(requests(), min_size=1, max_size=4))
async def test_the_receiver_never_answers_5xx(
    make_client: MakeClient, batch: list[tuple[bytes, dict[str, str]]]
) -> None:
    client = await _client(make_client)
    for body, headers in batch:
        response = await client.post(PATH, data=body, headers=headers)
        assert response.status < 500, await response.text()
        if response.status >= 400:
            answer = await response.json()  # every error is ours, and JSON
            assert answer["error"] and answer["message"]
            continue
        task_id = _task_id(body, headers)
        if isinstance(task_id, str) and task_id:
            for path in (f"/tasks/{task_id}", f"/tasks/{task_id}/history"):
                read = await client.get(path.replace("#", "%23").replace("?", "%3F"))
                assert read.status < 500, await read.text()


@pytest.mark.parametrize("path", ["/tasks", "/tasks/x/history", "/dead-letters", "/readyz"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    query=st.dictionaries(
        st.sampled_from(
            ["limit", "cursor", "phase", "type", "updated_since", "order", "handler", "x"]
        ),
        st.one_of(st.text(max_size=30), st.integers(-(2**80), 2**80).map(str)),
        max_size=4,
    )
)
async def test_the_read_api_never_answers_5xx(
    make_client: MakeClient, path: str, query: dict[str, str]
) -> None:
    client = await _client(make_client)
    response = await client.get(path, params=query)
    assert response.status < 500, await response.text()
