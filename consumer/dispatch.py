"""Hand committed phase changes to handlers, off the ingestion path (first cut).

Changes reach the dispatcher two ways: pushed by the ingestor right after a commit (low
latency) and read from the store's outbox at start and after every push (nothing is
lost across a crash: a change stays pending until every handler has been given it).

Guarantees of this first cut, stated plainly: each change is given to each handler at
least once, in commit order; a crash between a handler returning and the outbox being
marked can repeat a change. A handler that raises or exceeds its timeout is logged and
never affects ingestion or the other handlers. Retries with backoff, dead letters,
per-handler delivery records and per-task concurrency are the dispatcher issue's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from consumer.model import Task
from consumer.secrets import redact
from consumer.store import ChangeRecord, Store

__all__ = ["Dispatcher", "Handler", "NamedHandler", "PhaseChange"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PhaseChange:
    """What a handler receives: the materialized phase of ``task_id`` changed.

    ``task`` is the materialized task right after the change, credentials hidden.
    ``changed_at`` is the snapshot's ``status.updatedAt`` (Unix ms); ``seq`` orders changes.
    """

    task_id: str
    previous_phase: str | None
    phase: str
    task: Task
    event_id: str
    changed_at: int | float
    seq: int

    @classmethod
    def from_record(cls, record: ChangeRecord) -> PhaseChange:
        return cls(
            task_id=record.task_id,
            previous_phase=record.previous_phase,
            phase=record.phase,
            task=Task.model_validate(redact(record.task)),
            event_id=record.event_id,
            changed_at=record.changed_at,
            seq=record.seq,
        )


Handler = Callable[[PhaseChange], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class NamedHandler:
    name: str
    fn: Handler


class Dispatcher:
    def __init__(
        self, store: Store, handlers: Sequence[NamedHandler], *, timeout_s: float = 30.0
    ) -> None:
        self._store = store
        self._handlers = list(handlers)
        self._timeout_s = timeout_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failures = 0

    async def start(self) -> None:
        self._wake.set()  # pick up whatever a previous run left in the outbox
        self._task = asyncio.create_task(self._run(), name="dispatch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def notify(self, changes: Sequence[ChangeRecord]) -> None:
        """Called by the ingestor after a commit that recorded phase changes."""
        del changes  # the outbox is the source of truth; this is only a wake-up
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := await self._store.pending_changes(500):
                for record in batch:
                    await self._deliver(record)
                await self._store.mark_dispatched([r.seq for r in batch])

    async def _deliver(self, record: ChangeRecord) -> None:
        if not self._handlers:
            return
        change = PhaseChange.from_record(record)
        for handler in self._handlers:
            try:
                await asyncio.wait_for(handler.fn(change), self._timeout_s)
                self.delivered += 1
            except Exception:
                self.failures += 1
                log.exception(
                    "handler %s failed for change %d (%s: %s -> %s)",
                    handler.name,
                    record.seq,
                    record.task_id,
                    record.previous_phase,
                    record.phase,
                )
