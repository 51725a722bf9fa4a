"""SIGKILL during dispatch: after a restart every change reaches the handler, and none
that the handler had returned for (its delivery recorded) reaches it again."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.process.service_proc import ServiceProcess
from tests.process.test_crash import fetch, no_pending_changes, send_all
from tests.support import Delivery, deliveries, wait_until

pytestmark = pytest.mark.slow
HANDLER = "tests.process.recording_handler:record_slow"


async def test_sigkill_during_dispatch(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    env = {
        "PHASEWATCH_HANDLERS": HANDLER,
        "PHASEWATCH_TEST_RECORD": str(record),
        "PHASEWATCH_DISPATCH_CONCURRENCY": "4",
    }
    db = tmp_path / "d.db"
    service = ServiceProcess(db, env).start()
    stream = sorted(deliveries("messy"), key=Delivery.order_key)
    assert len(await send_all(service.url, stream, concurrency=16)) == len(stream)
    # Ingestion is done; dispatch is still working through the changes. Kill it there:
    # once a tenth of them were delivered (whatever the fixture's size), before the rest.
    changes = (await fetch(service.url, "/readyz"))["changes"]
    kill_at = max(1, changes // 10)

    async def some_delivered() -> dict[str, Any] | None:
        status: dict[str, Any] = await fetch(service.url, "/readyz")
        delivered = status["dispatch"]["handlers"][HANDLER]["delivered"]
        return status if delivered >= kill_at else None

    status = await wait_until(some_delivered, f"{kill_at} of {changes} changes delivered")
    assert status["pendingChanges"] > 0, "the kill should land mid-dispatch"
    first_pid = service.proc.pid if service.proc else 0
    service.kill()

    with sqlite3.connect(db) as con:
        done_before = {
            seq
            for (seq,) in con.execute(
                "SELECT seq FROM deliveries WHERE handler = ? AND status = 'done'", (HANDLER,)
            )
        }
        all_changes = {seq for (seq,) in con.execute("SELECT seq FROM changes")}
    assert done_before

    service = ServiceProcess(db, env, port=service.port).start()
    try:
        await wait_until(
            lambda: no_pending_changes(service.url), "every change delivered", timeout=60
        )
        calls = [orjson.loads(line) for line in record.read_bytes().splitlines()]
        after = [seq for seq, pid in calls if pid != first_pid]
        assert {seq for seq, _ in calls} == all_changes  # nothing lost
        assert not done_before & set(after)  # nothing recorded as done came again
        assert len(after) == len(set(after))
    finally:
        service.stop()
