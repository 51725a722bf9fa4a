"""Retention of the changes feed: ``PHASEWATCH_CHANGES_RETENTION`` parsed
(:func:`parse_retention`), and the loop in ``serve`` that prunes the outbox
(:class:`RetentionLoop`). The history is never touched, and the store never prunes a
change a handler still needs (see :meth:`~consumer.store.base.OutboxStore.prune_changes`).

Processes sharing one store (replicas on PostgreSQL) prune under one lease,
``changes:retention``, so one of them does the work at a time; another takes over when
the holder stops renewing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from consumer.core import times
from consumer.core.secrets import describe_error
from consumer.store.base import LeaseStore

__all__ = ["LEASE", "Retention", "RetentionLoop", "RetentionStore", "parse_retention"]

log = logging.getLogger(__name__)

LEASE = "changes:retention"

_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_SPAN = re.compile(r"(\d{1,12})([smhd])")
_COUNT = re.compile(r"\d{1,18}")


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of the outbox to keep: changes younger than ``max_age_ms``, or the newest
    ``keep_last``; neither: everything."""

    max_age_ms: int | None = None
    keep_last: int | None = None

    @property
    def keeps_everything(self) -> bool:
        return self.max_age_ms is None and self.keep_last is None

    def describe(self) -> str:
        if self.max_age_ms is not None:
            return f"changes recorded in the last {self.max_age_ms // 1000} s"
        if self.keep_last is not None:
            return f"the newest {self.keep_last} changes"
        return "every change"


def parse_retention(text: str) -> Retention:
    """``7d``, ``12h``, ``30m``, ``90s``: a time; a plain integer: a count of changes;
    ``0`` or ``off``: keep everything. Raises ValueError saying what is accepted."""
    value = text.strip().lower()
    if value in ("0", "off"):
        return Retention()
    span = _SPAN.fullmatch(value)
    if span is not None:
        ms = int(span[1]) * _UNITS_MS[span[2]]
        return Retention(max_age_ms=ms) if ms else Retention()
    if _COUNT.fullmatch(value):
        return Retention(keep_last=int(value))
    raise ValueError(
        "must be a time (e.g. 7d, 12h, 30m, 90s), a count of changes (e.g. 100000), "
        "or 0/off to keep every change"
    )


class RetentionStore(LeaseStore, Protocol):
    """What pruning uses: the outbox and the leases."""

    async def prune_changes(
        self,
        *,
        before_ms: int | None = None,
        keep_last: int | None = None,
        needed_by: Sequence[str] | None = None,
    ) -> int: ...


class RetentionLoop:
    """Prune every ``interval_s`` (the first time at start) while holding the lease.
    ``needed_by``: the handlers this service runs; a cursor of a handler no longer
    configured does not hold pruning back. Failures are logged and retried next time."""

    def __init__(
        self,
        store: RetentionStore,
        retention: Retention,
        *,
        needed_by: Sequence[str],
        interval_s: float = 60.0,
        owner: str | None = None,
    ) -> None:
        self._store = store
        self.retention = retention
        self._needed_by = list(needed_by)
        self._interval_s = interval_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # A holder that stops renewing (crashed) is replaced after a few missed rounds.
        self._ttl_ms = max(int(interval_s * 3000), 1000)
        self._task: asyncio.Task[None] | None = None
        self.pruned = 0  # changes this process pruned since start
        self.rounds = 0  # rounds completed (held or not), for tests and figures

    async def start(self) -> None:
        if self.retention.keeps_everything or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="changes-retention")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        with contextlib.suppress(Exception):
            await self._store.release_lease(LEASE, self.owner)

    async def prune_once(self, now_ms: int | None = None) -> int | None:
        """One round: the number of changes pruned, or None when another process holds
        the lease (it prunes)."""
        now = times.now_ms() if now_ms is None else now_ms
        holder = await self._store.acquire_lease(LEASE, self.owner, self._ttl_ms, now)
        if holder != self.owner:
            return None
        retention = self.retention
        gone = await self._store.prune_changes(
            before_ms=now - retention.max_age_ms if retention.max_age_ms is not None else None,
            keep_last=retention.keep_last,
            needed_by=self._needed_by,
        )
        self.pruned += gone
        if gone:
            log.info("changes retention: pruned %d change(s), kept %s", gone, retention.describe())
        return gone

    async def _run(self) -> None:
        while True:
            try:
                await self.prune_once()
            except Exception as exc:
                log.warning("changes retention: pruning failed: %s", describe_error(exc))
            self.rounds += 1
            await asyncio.sleep(self._interval_s)
