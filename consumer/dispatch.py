"""Hand committed phase changes to handlers, off the ingestion path (first cut).

Changes reach the dispatcher two ways: pushed by the ingestor right after a commit (low
latency) and read from the store's outbox at start and after every push (nothing is
lost across a crash: a change stays pending until every handler has been given it).

Several processes may share one store (two replicas consuming one Kafka group into one
database): only the holder of the store's ``dispatch`` lease delivers, so a change is not
handed out once per process. The lease outlives the handler timeout; if its holder dies,
another process takes over when it expires (at once, if the holder was a process of
this host that has exited: a restart does not wait out its own lease).

Guarantees of this first cut, stated plainly: each change is given to each handler at
least once, in commit order; a crash between a handler returning and the outbox being
marked can repeat a change. A process without handlers never touches the outbox. A
handler that raises or exceeds its timeout is logged and never affects ingestion or the
other handlers. Retries with backoff, dead letters,
per-handler delivery records and per-task concurrency are the dispatcher issue's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
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
        self,
        store: Store,
        handlers: Sequence[NamedHandler],
        *,
        timeout_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> None:
        self._store = store
        self._handlers = list(handlers)
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        # Long enough that a handler at its timeout never outlives the lease.
        self._lease_ms = int((2 * timeout_s + 10) * 1000)
        self._lease_renewed = 0.0
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failures = 0

    async def start(self) -> None:
        if not self._handlers:
            return  # nothing to deliver to; leave the outbox to processes that have handlers
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
            # Polling too: another process may commit changes, or drop the lease.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()
            try:
                await self._drain()
            except Exception:
                log.exception("dispatch pass failed; retrying")

    async def _drain(self) -> None:
        while await self._hold_lease(force=True) and (
            batch := await self._store.pending_changes(500)
        ):
            for record in batch:
                if not await self._hold_lease():
                    return
                await self._deliver(record)
            await self._store.mark_dispatched([r.seq for r in batch])

    async def _hold_lease(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._lease_renewed < self._lease_ms / 3000:
            return True
        now_ms = time.time_ns() // 1_000_000
        holder = await self._store.acquire_lease("dispatch", self._owner, self._lease_ms, now_ms)
        if holder != self._owner and _dead_here(holder):
            # A crashed process on this host (a restart): no need to wait out its lease.
            holder = await self._store.acquire_lease(
                "dispatch", self._owner, self._lease_ms, now_ms, take_from=holder
            )
        held = holder == self._owner
        self._lease_renewed = now if held else 0.0
        return held

    async def _deliver(self, record: ChangeRecord) -> None:
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


def _dead_here(owner: str) -> bool:
    """Whether a lease owner ``host:pid:nonce`` is a process of this host that has exited."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return False
