"""Helpers for tests: the shared fixture streams and small builders."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, overload

import orjson

from consumer.store.base import Delivery as StoredDelivery
from consumer.store.base import DeliveryStatus
from consumer.store.sqlite.store import SQLiteStore

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PHASEWATCH_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
FIXTURE_SECRET = b"whsec_fixture"

T = TypeVar("T")


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    shown = repr(last)
    if len(shown) > 800:
        shown = shown[:800] + "..."
    return AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {shown})")


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T | None]],
    what: str,
    *,
    timeout: float = ...,
    interval: float = ...,
) -> T: ...
@overload
async def wait_until(
    predicate: Callable[[], T | None], what: str, *, timeout: float = ..., interval: float = ...
) -> T: ...
async def wait_until(
    predicate: Callable[[], Any], what: str, *, timeout: float = 30, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` (plain or async) until it returns something truthy, and return
    that (never None). When ``timeout`` passes first, fail with an AssertionError naming
    ``what`` was waited for and the last value seen: a wait never falls through silently."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)


def wait_until_sync(
    predicate: Callable[[], T | None], what: str, *, timeout: float = 30, interval: float = 0.05
) -> T:
    """:func:`wait_until` for code that runs outside an event loop (blocking sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)


@dataclass(frozen=True)
class Delivery:
    signature: str
    body: bytes

    @property
    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(self.body)
        return doc

    def order_key(self) -> tuple[Any, ...]:
        doc = self.doc
        snapshot = doc["payload"]["task"]["snapshot"]
        return (snapshot["status"]["updatedAt"], doc["createdAt"], doc["id"])


@cache
def deliveries(name: str) -> tuple[Delivery, ...]:
    lines = (FIXTURES / name / "deliveries.jsonl").read_bytes().splitlines()
    out = []
    for line in lines:
        if line.strip():
            d = orjson.loads(line)
            out.append(Delivery(d["signature"], d["body"].encode()))
    return tuple(out)


@cache
def _expected(name: str, file: str) -> bytes:
    return (FIXTURES / name / file).read_bytes()


def expected_tasks(name: str) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = orjson.loads(_expected(name, "expected_tasks.json"))
    return result


def expected_changes(name: str) -> dict[str, list[list[str | None]]]:
    result: dict[str, list[list[str | None]]] = orjson.loads(
        _expected(name, "expected_phase_changes_in_order.json")
    )
    return result


def webhook_body(
    event_id: str,
    snapshot: dict[str, Any],
    *,
    event: str = "task.updated",
    created_at: int | None = None,
    timestamp: int | None = None,
) -> bytes:
    created = created_at if created_at is not None else snapshot["status"]["updatedAt"]
    return orjson.dumps(
        {
            "id": event_id,
            "webhookId": "wh-test",
            "createdAt": created,
            "timestamp": timestamp if timestamp is not None else created,
            "event": event,
            "payload": {
                "task": {"id": snapshot["id"], "type": snapshot.get("type"), "snapshot": snapshot}
            },
        }
    )


def snapshot(task_id: str, phase: str, updated_at: int, **fields: Any) -> dict[str, Any]:
    status = {"phase": phase, "updatedAt": updated_at}
    status.update(fields.pop("status_extra", {}))
    return {"id": task_id, "type": "upload", "createdAt": 1, **fields, "status": status}


class WatchedSQLiteStore(SQLiteStore):
    """A SQLiteStore that counts the dispatcher's housekeeping passes: every pass asks,
    once per handler, for the deliveries an operator moved to 're-drive', then fills that
    handler's queue. A test waits for passes to see that something did *not* happen."""

    redrive_reads = 0

    async def list_deliveries(
        self, statuses: Sequence[DeliveryStatus], handler: str | None = None, limit: int = 100
    ) -> list[StoredDelivery]:
        if list(statuses) == [DeliveryStatus.REDRIVE]:
            self.redrive_reads += 1
        return await super().list_deliveries(statuses, handler, limit)

    async def dispatcher_passes(self, passes: int = 2, *, handlers: int = 1) -> None:
        """Return once the dispatcher has made ``passes`` complete passes from now on."""
        # A pass may be under way: one more pass's reads make sure that many are whole.
        target = self.redrive_reads + (passes + 1) * handlers
        await wait_until(
            lambda: self.redrive_reads >= target, f"{passes} more dispatcher passes", timeout=30
        )


class CrossLoopEvent:
    """An event that handler code sets or awaits on its own loop and thread (handlers run
    on one of their own, see consumer.dispatch.runner) while the test sets or awaits it
    on the test's: an ``asyncio.Event`` belongs to one loop."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once set. Never gives up: callers bound it (``asyncio.wait_for``)."""
        while not self._event.is_set():
            await asyncio.sleep(0.005)
