"""Stuck-task alerts: the sweeper that records them, and the ``phase:seconds`` settings.

Studio leaves a running task that stopped reporting in "running" for good (spec §7), and
nothing tells the user. A subscription with ``stale_for`` (``@on(phase="running",
stale_for=300)``, ``PHASEWATCH_NOTIFY_STALE=running:300``) asks to hear, once, about a
task that stays in a phase with no newer snapshot for that long after its
``status.updatedAt``.

There are no timers in memory. The store keeps the view; :class:`StaleSweeper`, run by
``serve``, asks it every few seconds for the tasks now due
(:meth:`~consumer.store.base.StaleStore.record_stale`), which records each as a change of
kind ``stale:<ms>`` in the outbox, with a note that makes it once per ``(task, phase,
updatedAt, threshold)``, in one transaction. The dispatcher then delivers those changes
like any other (to the subscriptions that asked, see
:meth:`~consumer.dispatch.subscription.Subscription.wants`), in order per task, with
retries and dead letters. So alerts survive restarts (a task due while the service was
down is alerted at the next sweep), and replicas sharing a store alert once: they sweep
under one lease (``stale``), and the store's note holds even if two sweep at once. A
newer snapshot cancels the wait (the task leaves the phase, or its ``updatedAt`` moves
and the wait starts again: a later alert is a new one).

Every process also counts the tasks stale now, per watched phase (at its shortest
threshold), for ``phasewatch_tasks_stale{phase=...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from consumer.core import times
from consumer.core.change import ChangeRecord
from consumer.core.secrets import describe_error
from consumer.store.base import LeaseStore

__all__ = [
    "LEASE",
    "StaleSweeper",
    "SweepStore",
    "Watch",
    "parse_stale",
    "watches_of",
]

log = logging.getLogger(__name__)

LEASE = "stale"
# A year: longer than any wait worth alerting on (and what on() accepts).
_MAX_S = 366 * 86400.0

Watch = tuple[str, int]
"""``(phase, stale_for_ms)``: one wait the sweeper watches."""

ChangeSink = Callable[[Sequence[ChangeRecord]], None]


class _HasStale(Protocol):
    def stale_watches(self) -> set[tuple[str, int]]: ...


def watches_of(subscriptions: Iterable[_HasStale]) -> list[Watch]:
    """Every ``(phase, stale_for_ms)`` the subscriptions want alerts for, sorted."""
    return sorted({w for sub in subscriptions for w in sub.stale_watches()})


def parse_stale(text: str) -> dict[str, float]:
    """``running:300,processing:900`` -> ``{"running": 300.0, "processing": 900.0}``:
    phase and seconds (a positive number, at most a year), comma-separated; empty: none.
    Raises ValueError saying which item is wrong and how."""
    out: dict[str, float] = {}
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        return out
    for number, item in enumerate(items, 1):
        phase, colon, seconds = item.partition(":")
        phase, seconds = phase.strip(), seconds.strip()
        if not colon or not phase or not seconds:
            raise ValueError(
                f"item {number} is not phase:seconds (expected e.g. running:300,processing:900)"
            )
        if phase in out:
            raise ValueError(f"item {number}: phase {phase!r} is given twice")
        try:
            value = float(seconds)
        except ValueError:
            raise ValueError(
                f"item {number} ({phase}): the seconds must be a number, e.g. {phase}:300"
            ) from None
        if not math.isfinite(value) or value < 0.001 or value > _MAX_S:
            raise ValueError(
                f"item {number} ({phase}): the seconds must be positive and at most"
                f" {_MAX_S:.0f} (a year)"
            )
        out[phase] = value
    return out


class SweepStore(LeaseStore, Protocol):
    """What the sweeper uses: the stale alerts and the leases."""

    async def record_stale(
        self, phase: str, stale_for_ms: int, now_ms: int, limit: int = 500
    ) -> list[ChangeRecord]: ...

    async def count_stale(self, phase: str, stale_for_ms: int, now_ms: int) -> int: ...


class StaleSweeper:
    """Every ``interval_s``: count the tasks stale now, and, while holding the ``stale``
    lease, record the alerts due for each of ``watches``, ``batch`` at a time, handing
    each batch to ``on_changes`` (the dispatcher wakes). ``clock``: Unix ms (tests move
    it). A failed round is logged and the next one tries again."""

    def __init__(
        self,
        store: SweepStore,
        watches: Iterable[Watch],
        *,
        interval_s: float = 5.0,
        lease_s: float = 15.0,
        batch: int = 500,
        owner: str | None = None,
        clock: Callable[[], int] = times.now_ms,
        on_changes: ChangeSink | None = None,
    ) -> None:
        if interval_s <= 0 or lease_s <= 0 or batch < 1:
            raise ValueError("interval_s and lease_s must be positive, batch at least 1")
        self._store = store
        self.watches = sorted(set(watches))
        self._interval_s = interval_s
        self._lease_ms = int(max(lease_s, interval_s * 3) * 1000)
        self._batch = batch
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._on_changes = on_changes
        self._task: asyncio.Task[None] | None = None
        self.leader = False
        self.alerts = 0  # alerts this process recorded since start
        self.rounds = 0  # rounds completed (held or not)
        self.failed_rounds = 0
        # Per phase, the tasks in it past its shortest threshold, as last counted.
        self.stale_now: dict[str, int] = {}

    async def start(self) -> None:
        if not self.watches or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="stale-sweeper")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self.leader:
            try:
                await self._store.release_lease(LEASE, self.owner)
            except Exception as exc:
                log.warning("could not release the stale lease: %s", describe_error(exc))
            self.leader = False

    def status(self) -> dict[str, Any]:
        """For /readyz and /metrics."""
        return {
            "leader": self.leader,
            "alerts": self.alerts,
            "rounds": self.rounds,
            "failedRounds": self.failed_rounds,
            "watches": [f"{phase}:{ms / 1000:g}" for phase, ms in self.watches],
            "staleTasks": dict(self.stale_now),
        }

    async def count_once(self, now_ms: int | None = None) -> dict[str, int]:
        """Count the tasks stale now, per watched phase at its shortest threshold."""
        now = self._clock() if now_ms is None else now_ms
        shortest: dict[str, int] = {}
        for phase, ms in self.watches:
            shortest[phase] = min(ms, shortest.get(phase, ms))
        counts = {
            phase: await self._store.count_stale(phase, ms, now) for phase, ms in shortest.items()
        }
        self.stale_now = counts
        return counts

    async def sweep_once(self, now_ms: int | None = None) -> list[ChangeRecord] | None:
        """One round of alerts: the changes recorded, or None when another process
        holds the lease (it sweeps)."""
        now = self._clock() if now_ms is None else now_ms
        holder = await self._store.acquire_lease(LEASE, self.owner, self._lease_ms, now)
        self.leader = holder == self.owner
        if not self.leader:
            return None
        recorded: list[ChangeRecord] = []
        for phase, ms in self.watches:
            while True:
                batch = await self._store.record_stale(phase, ms, now, self._batch)
                if batch:
                    recorded.extend(batch)
                    self.alerts += len(batch)
                    if self._on_changes is not None:
                        self._on_changes(batch)
                if len(batch) < self._batch:
                    break
        if recorded:
            log.info(
                "stale alerts: recorded %d (%s)",
                len(recorded),
                ", ".join(sorted({f"{c.phase} {c.kind}" for c in recorded})),
            )
        return recorded

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception as exc:
                self.failed_rounds += 1
                log.warning("stale alerts: sweep failed: %s", describe_error(exc))
            try:
                await self.count_once()
            except Exception as exc:
                log.warning("stale alerts: counting failed: %s", describe_error(exc))
            self.rounds += 1
            await asyncio.sleep(self._interval_s)
