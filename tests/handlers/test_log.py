"""log_changes: one compact JSON line per change, credentials hidden."""

from __future__ import annotations

import io

import orjson
import pytest

from handlers import log_changes
from tests.handlers.support import assert_no_credentials, make_change


async def test_one_json_line_per_change() -> None:
    stream = io.StringIO()
    sub = log_changes(stream)
    changes = [make_change(seq=1, phase="running"), make_change(seq=2, phase="failed")]
    for change in changes:
        await sub.fn(change)
    lines = stream.getvalue().splitlines(keepends=True)
    assert len(lines) == 2
    assert all(line.endswith("}\n") and "\n" not in line[:-1] for line in lines)
    assert [orjson.loads(line) for line in lines] == [c.summary() for c in changes]
    keys = [orjson.loads(line)["idempotencyKey"] for line in lines]
    assert keys == [c.idempotency_key for c in changes]
    assert all(key.startswith("pw1_") for key in keys)
    assert ", " not in lines[0]  # compact
    assert_no_credentials(stream.getvalue())


async def test_defaults_to_stdout_resolved_at_call_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sub = log_changes()
    await sub.fn(make_change(seq=3))
    out = capsys.readouterr().out
    assert orjson.loads(out) == make_change(seq=3).summary()


def test_updates_are_opt_in() -> None:
    update = make_change(kind="update", phase="running", previous="running")
    assert log_changes().name == "log"
    assert log_changes().updates is False
    assert not log_changes().matches(update)
    assert log_changes(updates=True).matches(update)
    assert log_changes(name="audit").name == "audit"
    assert not log_changes(phases="completed").matches(make_change(phase="failed"))


async def test_update_lines_say_so() -> None:
    stream = io.StringIO()
    await log_changes(stream, updates=True).fn(
        make_change(kind="update", phase="running", previous="running")
    )
    assert orjson.loads(stream.getvalue())["kind"] == "update"
