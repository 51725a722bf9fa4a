"""The batches one process has in flight at once, and what each leaves its tasks as.

:class:`~consumer.store.postgres.store.PostgresStore` pipelines: it reads and plans a
batch while the one before it is still being written. When two such batches share a
task, the later one cannot read that task from the database (the earlier write has not
committed yet), and reading it anyway would make its write conflict, every time. So it
takes the task as the earlier batch's plan leaves it (the state, and the version and rev
the row will have after that write), waits for that write, and writes on top of it. If
the earlier write did not commit as planned, the later batch reads again under locks.

Webhook traffic shares tasks between neighbouring batches all the time (a task's events
come in bursts): in ``bench/pg_profile.py`` three batches in five overlapped the one in
flight before them.

Pure bookkeeping: no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from consumer.core.fold import TaskState
from consumer.core.plan import DedupKey

__all__ = ["Flight", "Flights", "Row"]


@dataclass(slots=True)
class Row:
    """A view row as a batch read it, or as its write will leave it."""

    state: TaskState
    version: int
    rev: int  # what the write checks; 0: no row


@dataclass(slots=True, eq=False)
class Flight:
    """One batch in flight."""

    planned: asyncio.Future[None]  # view and new_keys are final
    written: asyncio.Future[bool]  # True: committed exactly as planned
    view: dict[str, Row] = field(default_factory=dict)
    new_keys: set[DedupKey] = field(default_factory=set)

    def plan_made(self, view: dict[str, Row], new_keys: set[DedupKey]) -> None:
        self.view, self.new_keys = view, new_keys
        if not self.planned.done():
            self.planned.set_result(None)

    def finish(self, committed: bool) -> None:
        """Resolve both futures (idempotent: the first outcome stays)."""
        if not self.planned.done():
            self.planned.set_result(None)
        if not self.written.done():
            self.written.set_result(committed)


class Flights:
    """The latest flight per task."""

    def __init__(self) -> None:
        self._latest: dict[str, Flight] = {}

    def start(self, task_ids: Iterable[str]) -> tuple[Flight, dict[str, Flight]]:
        """A new flight for ``task_ids``, and the earlier flight of each that has one."""
        loop = asyncio.get_running_loop()
        flight = Flight(loop.create_future(), loop.create_future())
        earlier: dict[str, Flight] = {}
        for task_id in task_ids:
            before = self._latest.get(task_id)
            if before is not None:
                earlier[task_id] = before
            self._latest[task_id] = flight
        return flight, earlier

    def end(self, flight: Flight, task_ids: Iterable[str]) -> None:
        flight.finish(False)
        for task_id in task_ids:
            if self._latest.get(task_id) is flight:
                del self._latest[task_id]
