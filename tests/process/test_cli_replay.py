"""The replay commands as a user runs them: import, rebuild (--check), replay handlers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from tests.process.test_cli import run
from tests.support import FIXTURES, expected_changes

pytestmark = pytest.mark.slow


def test_import_rebuild_and_replay_handlers(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    env = {"PHASEWATCH_DATABASE_URL": f"sqlite:///{db}"}
    imported = run("import", str(FIXTURES / "small" / "deliveries.jsonl"), env=env)
    assert imported.returncode == 0, imported.stderr
    with sqlite3.connect(db) as con:
        # An archive is the past: by default it reaches no live handler.
        assert con.execute("SELECT count(*) FROM changes").fetchone() == (0,)

    assert run("replay", "rebuild", "--check", env=env).returncode == 0
    with sqlite3.connect(db) as con:
        con.execute('UPDATE tasks SET doc = \'{"id":"x"}\' WHERE rowid = 1')
    check = run("replay", "rebuild", "--check", env=env)
    assert check.returncode == 1 and "1 differ" in check.stderr
    assert run("replay", "rebuild", env=env).returncode == 0
    assert run("replay", "rebuild", "--check", env=env).returncode == 0

    completed = sum(c[1] == "completed" for cs in expected_changes("small").values() for c in cs)
    dry = run(
        "replay",
        "handlers",
        "--since",
        "0",
        "--phase",
        "completed",
        "--dry-run",
        env={**env, "PHASEWATCH_HANDLERS": "tests.process.recording_handler:record"},
    )
    assert dry.returncode == 0 and len(dry.stdout.splitlines()) == completed

    record = tmp_path / "replayed.jsonl"
    replayed = run(
        "replay",
        "handlers",
        "--since",
        "2025-01-01T00:00:00Z",
        "--phase",
        "completed",
        env={
            **env,
            "PHASEWATCH_HANDLERS": "tests.process.recording_handler:record",
            "PHASEWATCH_TEST_RECORD": str(record),
        },
    )
    assert replayed.returncode == 0, replayed.stderr
    lines = [orjson.loads(x) for x in record.read_bytes().splitlines()]
    assert len(lines) == completed
    assert all(line[3] == "completed" for line in lines)
    unknown = run(
        "replay",
        "handlers",
        "--since",
        "0",
        "--handler",
        "nope",
        env={**env, "PHASEWATCH_HANDLERS": "tests.process.recording_handler:record"},
    )
    assert unknown.returncode == 2 and "nope" in unknown.stderr
