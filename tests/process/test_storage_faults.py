"""A store that cannot write, for real: the file-size limit of the service's process is
lowered until writes fail at the OS, then raised again."""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

import pytest

from tests.process.service_proc import ServiceProcess
from tests.support import snapshot, wait_until_sync, webhook_body

pytestmark = pytest.mark.slow

HOOK = "/webhooks/livepeer"
LIMIT = 2_000_000  # bytes any file of the service's may grow to


def limited() -> None:
    # The soft limit only: the test raises it again later, which needs no privilege.
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))
    # Writes past the limit then fail with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_readyz_is_503_while_commits_fail_and_ready_again_after(tmp_path: Path) -> None:
    """/readyz said "ready" while every commit failed, and the log said "cannot
    rollback" instead of the real error."""
    service = ServiceProcess(
        tmp_path / "pw.db", preexec=limited, PHASEWATCH_SQLITE_WRITER="thread"
    ).start()
    try:
        padding = "x" * 40_000
        statuses = []
        for i in range(200):  # ~8 MB in all: past the limit well before the end
            body = webhook_body(f"e{i}", snapshot(f"T{i}", "running", i + 1, note=padding))
            statuses.append(service.post(HOOK, body))
            if statuses[-1] != 200:
                break
        assert statuses[-1] == 503, f"no commit failed: {statuses[-5:]}"
        status, ready = service.get("/readyz")
        assert status == 503 and ready["error"] == "store_failing"
        assert "disk I/O error" in ready["message"] or "full" in ready["message"]
        log = service.log.read_text()
        assert "cannot rollback" not in log
        assert "disk I/O error" in log or "disk is full" in log
        # The disk has room again: /readyz finds out by itself, and webhooks are taken.
        assert service.proc is not None
        infinite = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(service.proc.pid, resource.RLIMIT_FSIZE, infinite)
        wait_until_sync(lambda: service.get("/readyz")[0] == 200, "/readyz to be 200 again")
        body = webhook_body("after", snapshot("T-after", "running", 1))
        assert service.post(HOOK, body) == 200
    finally:
        if service.proc is not None and service.proc.poll() is None:
            os.kill(service.proc.pid, signal.SIGTERM)
        service.stop()
