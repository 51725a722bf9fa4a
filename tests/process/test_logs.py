"""Logs as operators read them, from a real ``phasewatch serve``: one JSON object per line
with time, level, logger, message and the context of the line, an access log, and no
credential in any line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.process.service_proc import ServiceProcess
from tests.support import snapshot, wait_until_sync, webhook_body

pytestmark = pytest.mark.slow

SECRET = "hunter2hunter2"


def lines(service: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.log.read_text().splitlines() if line.strip()]


def test_json_logs_with_context_an_access_log_and_no_credentials(tmp_path: Path) -> None:
    (tmp_path / "failing.py").write_text(
        textwrap.dedent(
            f"""
            from handlers import on

            @on(max_attempts=1)
            async def upload(change):
                raise RuntimeError("PUT https://AKIA:{SECRET}@s3.example/b failed: 403")
            """
        )
    )
    service = ServiceProcess(
        tmp_path / "pw.db",
        cwd=tmp_path,
        PHASEWATCH_LOG_FORMAT="json",
        PHASEWATCH_ACCESS_LOG="1",
        PHASEWATCH_HANDLERS="failing:upload",
        PHASEWATCH_SQLITE_WRITER="thread",
    ).start()
    try:
        body = webhook_body("e1", snapshot("T1", "running", 1))
        assert service.post("/webhooks/livepeer", body) == 200
        assert service.post(f"/webhooks/livepeer?token={SECRET}", b"{}") == 400

        def dead_lettered() -> list[dict[str, Any]]:
            return [x for x in lines(service) if "dead-lettered" in x["message"]]

        (dead,) = wait_until_sync(dead_lettered, "the dead letter's log line")
    finally:
        service.stop()
    every = lines(service)  # every line parses as JSON
    for line in every:
        assert {"time", "level", "logger", "message"} <= set(line)
    assert dead["level"] == "ERROR" and dead["task_id"] == "T1" and dead["event_id"] == "e1"
    assert dead["handler"] == "failing.upload" or dead["handler"].endswith("upload")
    access = [x for x in every if x["logger"] == "phasewatch.access"]
    assert {(x["method"], x["status"]) for x in access} >= {("POST", 200), ("POST", 400)}
    assert all(x["path"].startswith("/") and x["duration_ms"] >= 0 for x in access)
    text = (tmp_path / "pw.log").read_text()
    assert SECRET not in text  # not in the handler's error, not in the access log's query
