"""The phasewatch command line, as a user runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from consumer.core.secrets import redact
from tests.process.service_proc import PHASEWATCH, ServiceProcess
from tests.support import FIXTURES, REPO, expected_changes, expected_tasks

pytestmark = pytest.mark.slow


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHASEWATCH, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        cwd=REPO,
        check=False,
    )


def test_help_documents_configuration() -> None:
    out = run("serve", "--help").stdout
    for name in (
        "PHASEWATCH_DATABASE_URL",
        "PHASEWATCH_WEBHOOK_SECRET",
        "PHASEWATCH_HANDLERS",
        "PHASEWATCH_WEBHOOK_TOLERANCE_S",
        "PHASEWATCH_API_TOKEN",
        "PHASEWATCH_HTTP_PORT",
    ):
        assert name in out


def test_bad_configuration_is_a_clear_error() -> None:
    result = run("tasks", "list", env={"PHASEWATCH_DATABASE_URL": "oracle://db"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "phasewatch: PHASEWATCH_DATABASE_URL: unknown database scheme 'oracle': use"
        " sqlite:///PATH, postgresql://USER@HOST:PORT/DB or memory://"
    )


def test_send_then_query_the_store(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    service = ServiceProcess(
        db, PHASEWATCH_WEBHOOK_SECRET="whsec_fixture", PHASEWATCH_WEBHOOK_TOLERANCE_S="0"
    ).start()
    try:
        sent = run(
            "send",
            str(FIXTURES / "small" / "deliveries.jsonl"),
            "--url",
            f"{service.url}/webhooks/livepeer",
        )
        assert sent.returncode == 0, sent.stderr
        assert "200: 289" in sent.stdout
    finally:
        assert service.stop() == 0  # graceful stop on SIGTERM
    env = {"PHASEWATCH_DATABASE_URL": f"sqlite:///{db}"}
    expected = expected_tasks("small")
    task_id = next(iter(expected))
    got = run("tasks", "get", task_id, env=env)
    assert got.returncode == 0 and orjson.loads(got.stdout) == redact(expected[task_id])
    assert run("tasks", "get", "nope", env=env).returncode == 1
    listed = run("tasks", "list", "--phase", "failed", "--json", env=env)
    failed = {orjson.loads(line)["id"] for line in listed.stdout.splitlines()}
    assert failed == {k for k, v in expected.items() if v["status"]["phase"] == "failed"}
    table = run("tasks", "list", "--limit", "1000", env=env)
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "PHASE", "UPDATED", "(UTC)"]
    assert len(rows) == len(expected)
    assert rows[0].split()[-1].endswith("+00:00")  # readable times, not Unix ms
    assert f"showing {len(expected)} of {len(expected)} tasks" in table.stderr
    some = run("tasks", "list", "--limit", "2", env=env)
    assert len(some.stdout.splitlines()) == 3 and f"of {len(expected)}" in some.stderr
    # Arguments that can match nothing are refused, naming the argument.
    typo = run("tasks", "list", "--phase", "complete", env=env)
    assert typo.returncode == 2 and "not a phase: 'complete'" in typo.stderr
    assert run("tasks", "list", "--limit", "0", env=env).returncode == 2
    history = run("tasks", "history", task_id, env=env)
    assert history.returncode == 0
    changes = expected_changes("small")[task_id]
    assert history.stdout.count(" -> ") == len(changes)
    as_json = orjson.loads(run("tasks", "history", task_id, "--json", env=env).stdout)
    assert [[c["previousPhase"], c["phase"]] for c in as_json["phaseChanges"]] == changes
    assert run("tasks", "history", "nope", env=env).returncode == 1
    unknown = run("dead-letters", "retry", "424242", env=env)
    assert unknown.returncode == 1 and "no dead letter with seq 424242" in unknown.stderr


def test_send_waits_for_the_server(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "w.db")
    url = f"{service.url}/webhooks/livepeer"
    sender = subprocess.Popen(
        [
            PHASEWATCH,
            "send",
            str(FIXTURES / "small" / "deliveries.jsonl"),
            "--url",
            url,
            "--wait",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        service.start()  # after send began: it must have waited, not failed
        out, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err
        assert "200: 289" in out
    finally:
        if sender.poll() is None:
            sender.kill()
        service.stop()


def test_send_gives_up_when_nothing_answers() -> None:
    result = run(
        "send",
        str(FIXTURES / "small" / "deliveries.jsonl"),
        "--url",
        "http://127.0.0.1:9/webhooks/livepeer",
        "--wait",
        "0.5",
    )
    assert result.returncode == 1 and "nothing answers" in result.stderr


def test_send_resign_against_a_fresh_window(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "r.db", PHASEWATCH_WEBHOOK_SECRET="other").start()
    try:
        url = f"{service.url}/webhooks/livepeer"
        stale = run("send", str(FIXTURES / "small" / "deliveries.jsonl"), "--url", url)
        assert stale.returncode == 1 and "401" in stale.stdout
        # What was wrong, once per status: the server's own error body.
        assert "first 401:" in stale.stdout and "bad_signature" in stale.stdout
        fresh = run(
            "send",
            str(FIXTURES / "small" / "deliveries.jsonl"),
            "--url",
            url,
            "--resign",
            "other",
            "--in-order",
        )
        assert fresh.returncode == 0 and "200: 289" in fresh.stdout
    finally:
        service.stop()
