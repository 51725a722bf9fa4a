"""Buggy handlers against a real ``phasewatch serve``: a handler that exits, or blocks
its thread, fails its own deliveries and nothing else."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.process.service_proc import ServiceProcess
from tests.support import snapshot, wait_until_sync, webhook_body

pytestmark = pytest.mark.slow

HOOK = "/webhooks/livepeer"


def serve_with(tmp_path: Path, module: str, handler: str) -> ServiceProcess:
    (tmp_path / "hostile.py").write_text(textwrap.dedent(module))
    return ServiceProcess(
        tmp_path / "pw.db",
        cwd=tmp_path,  # PHASEWATCH_HANDLERS finds the module there, as a user's would be
        PHASEWATCH_HANDLERS=f"hostile:{handler}",
        PHASEWATCH_SQLITE_WRITER="thread",
    ).start()


@pytest.fixture
def stopping() -> Iterator[list[ServiceProcess]]:
    services: list[ServiceProcess] = []
    yield services
    for service in services:
        if service.proc is not None and service.proc.poll() is None:
            service.kill()


@pytest.mark.parametrize("how", ["sys.exit(3)", "raise KeyboardInterrupt", "raise SystemExit"])
def test_a_handler_that_exits_is_dead_lettered_and_the_service_lives_on(
    tmp_path: Path, stopping: list[ServiceProcess], how: str
) -> None:
    """It used to kill the service on the first phase change, logging nothing, and again
    0.05 s after each restart: the outbox handed it the same change."""
    service = serve_with(
        tmp_path,
        f"""
        import sys
        from handlers import on

        @on(max_attempts=2, backoff_s=0.01, max_backoff_s=0.02)
        async def leave(change):
            {how}
        """,
        "leave",
    )
    stopping.append(service)
    assert service.post(HOOK, webhook_body("e1", snapshot("T1", "running", 1))) == 200

    def dead() -> list[dict[str, Any]]:
        assert service.proc is not None and service.proc.poll() is None, "the service died"
        letters: list[dict[str, Any]] = service.get("/dead-letters")[1]["deadLetters"]
        return letters

    (letter,) = wait_until_sync(dead, "the change to be dead-lettered")
    assert letter["attempts"] == 2 and "HandlerExit" in letter["error"]
    # Still serving: the next webhook is taken, and the service stops cleanly when asked.
    assert service.post(HOOK, webhook_body("e2", snapshot("T2", "running", 2))) == 200
    assert service.stop() == 0


def test_a_handler_that_blocks_its_thread_does_not_stall_ingestion(
    tmp_path: Path, stopping: list[ServiceProcess]
) -> None:
    """With time.sleep in an async handler, 45 of ~4,300 webhooks got through in 60 s:
    the handler ran on the receiver's loop. Each post below must answer within 10 s
    (the client's timeout) while the handler is stuck in its sleep."""
    inside = tmp_path / "inside"
    service = serve_with(
        tmp_path,
        f"""
        import pathlib, time
        from handlers import on

        @on(phase="running", timeout_s=120)
        async def block(change):
            pathlib.Path({str(inside)!r}).write_text("in")
            time.sleep(20)  # a synchronous call in an async handler
        """,
        "block",
    )
    stopping.append(service)
    assert service.post(HOOK, webhook_body("e0", snapshot("T0", "running", 1))) == 200
    wait_until_sync(inside.exists, "the handler to be inside its blocking call")
    for i in range(1, 51):
        body = webhook_body(f"e{i}", snapshot(f"T{i}", "pending", i))
        assert service.post(HOOK, body, timeout=10) == 200
    status, ready = service.get("/readyz")
    assert status == 200 and ready["events"] == 51

    # The handler's own loop is the one that is stuck, and the figures say so.
    def handler_lag() -> bool:
        (figures,) = service.get("/readyz")[1]["dispatch"]["handlers"].values()
        return bool(figures["loopLagSeconds"] > 1)

    wait_until_sync(handler_lag, "the blocked handler's loop lag to show")
    assert service.get("/readyz")[1]["loopLagSeconds"] < 1
