"""Reconcile with Studio: walk Livepeer Studio's task list (spec §7) and fold every task
in it as a bare-Task snapshot (source ``reconcile``), so that a task whose webhooks were
lost still reaches the view, and its phase change still reaches the handlers.

**The walk.** Studio's pages come through an OFFSET cursor: a task updated while a
client pages moves to the end of the ascending order, the rows behind it shift up by
one, and the next offset skips one of them. So the walk does not follow the cursor
across pages. It asks for ``updatedAt gte W`` in ascending order from offset 0, takes
the highest ``updatedAt`` of the page as the next ``W`` and asks again: every request
starts at a row it has seen (an overlap), and what was seen is dropped by
``(id, updatedAt)``. A task updated meanwhile comes back later with its new
``updatedAt``; none is skipped. The cursor is used only inside a plateau, a full page
whose tasks all share one ``updatedAt``, where no higher ``W`` exists to ask from. The
walk ends when Studio says there is no next page.

A page not in ascending order, or holding tasks below ``W``, stops the pass
(:class:`~consumer.sources.studio.BadResponse`): taking its highest ``updatedAt`` as the
next ``W`` would skip whatever lies between.

**The watermark.** The highest ``updatedAt`` folded is kept in the store's meta
(``reconcile:watermark``) after each page commits, and only ever moves forward. A pass
starts ``overlap_ms`` before it (updates Studio commits late); re-read tasks are
duplicates (a bare Task's event id is its content's hash) and change nothing. A store's
first pass starts from the oldest task in its view (what phasewatch has watched), or,
for an empty store, from now. ``since`` starts a pass elsewhere; a pass that starts
after the watermark does not move it (it left a gap).

**Repaired** tasks are those whose fold recorded a change: the webhooks had missed it.
Their changes go to ``on_changes`` (the dispatcher's wake-up), as the webhook ingestor's
do. **The loop** (:class:`ReconcileLoop`) runs a pass every ``interval_s`` on one
replica at a time: the holder of the ``reconcile`` lease, renewed while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from consumer.core.change import ChangeRecord
from consumer.core.codec import is_number
from consumer.core.plan import Outcome
from consumer.core.secrets import describe_error
from consumer.core.times import now_ms
from consumer.replay.job import Job
from consumer.sources.studio import (
    MAX_LIMIT,
    AuthError,
    BadResponse,
    Page,
    StudioClient,
    StudioError,
)
from consumer.store.base import Rejected, Store, TaskQuery

__all__ = [
    "LEASE",
    "SOURCE",
    "WATERMARK_KEY",
    "PassReport",
    "ReconcileLoop",
    "ReconcileStats",
    "load_watermark",
    "reconcile_pass",
]

log = logging.getLogger(__name__)

SOURCE = "reconcile"
WATERMARK_KEY = "reconcile:watermark"
LEASE = "reconcile"

ChangeSink = Callable[[Sequence[ChangeRecord]], None]


@dataclass(slots=True)
class PassReport:
    """What one pass did. ``seen`` counts task snapshots read, deduplicated by
    ``(id, updatedAt)`` within the pass; ``repaired`` tasks whose fold recorded a change;
    ``new`` snapshots the store did not hold; ``rejected`` tasks that are not usable."""

    start: int | float  # the updatedAt the walk started from (ms)
    watermark: int | float  # the highest updatedAt reached
    pages: int = 0
    requests: int = 0
    seen: int = 0
    repaired: int = 0
    new: int = 0
    rejected: int = 0
    total: int | None = None  # Studio's X-Total-Count at the start (approximate)
    interrupted: bool = False


@dataclass(slots=True)
class ReconcileStats:
    """Cumulative figures of a service's loop, for /readyz and /metrics."""

    passes: int = 0
    failed_passes: int = 0
    pages: int = 0
    tasks_seen: int = 0
    tasks_repaired: int = 0
    last_success_ms: int | None = None
    last_error: str | None = None
    leader: bool = False

    def as_dict(self, requests: int, errors: dict[str, int]) -> dict[str, Any]:
        return {
            "leader": self.leader,
            "passes": self.passes,
            "failedPasses": self.failed_passes,
            "pages": self.pages,
            "requests": requests,
            "tasksSeen": self.tasks_seen,
            "tasksRepaired": self.tasks_repaired,
            "lastSuccessMs": self.last_success_ms,
            "lastError": self.last_error,
            "errors": errors,
        }


async def load_watermark(store: Store) -> int | float | None:
    note = await store.get_meta(WATERMARK_KEY)
    if note is None:
        return None
    try:
        value = orjson.loads(note)
    except orjson.JSONDecodeError:
        value = None
    if not is_number(value):
        log.warning("ignoring an unreadable %s note in the store", WATERMARK_KEY)
        return None
    mark: int | float = value
    return mark


async def reconcile_pass(
    store: Store,
    client: StudioClient,
    *,
    since: int | float | None = None,
    overlap_ms: int = 60_000,
    on_changes: ChangeSink | None = None,
    job: Job | None = None,
    limit: int = MAX_LIMIT,
) -> PassReport:
    """Walk Studio's task list once (see the module docstring) and fold what it holds.
    Raises :class:`~consumer.sources.studio.StudioError` when a page cannot be had; what
    was folded before stays folded, and the watermark says how far it got."""
    job = job or Job()
    stored = await load_watermark(store)
    if since is not None:
        start = since
    elif stored is not None:
        start = max(stored - overlap_ms, 0)
    else:
        start = await _first_start(store, overlap_ms)
    # A pass that starts past the watermark leaves a gap behind it: it must not move it.
    covers = stored is None or start <= stored
    saved = stored
    report = PassReport(start=start, watermark=start)
    requests_before = client.stats.requests
    walk = _Walk(start)
    repaired: set[str] = set()
    try:
        while True:
            page = await client.list_tasks(
                updated_since=walk.since, limit=limit, cursor=walk.cursor, count=not report.pages
            )
            report.pages += 1
            if report.total is None:
                report.total = page.total
            fresh = walk.take(page.tasks, client.shown_url)
            if fresh:
                await _fold(store, fresh, report, repaired, on_changes)
            report.watermark = max(report.watermark, walk.top)
            if covers and (saved is None or report.watermark > saved):
                saved = report.watermark
                await store.set_meta(WATERMARK_KEY, orjson.dumps(saved).decode())
            job.report(report.seen, max(report.total or 0, report.seen) or None)
            if job.batch_done():
                report.interrupted = True
                break
            if not page.more or not page.tasks or not walk.advance(page, client.shown_url):
                break
    finally:
        report.requests = client.stats.requests - requests_before
    if covers and saved is None:
        await store.set_meta(WATERMARK_KEY, orjson.dumps(start).decode())
    return report


async def _first_start(store: Store, overlap_ms: int) -> int | float:
    """A store's first pass: from the oldest task it watched, or now for an empty one."""
    page = await store.list_tasks(TaskQuery(limit=1))
    if page.tasks:
        return page.tasks[0].updated_at
    return max(now_ms() - overlap_ms, 0)


@dataclass(slots=True)
class _Walk:
    """Where the walk asks from next, and what it has seen since (deduplication)."""

    since: int | float
    cursor: str | None = None
    top: int | float = 0
    seen: set[tuple[str, int | float]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.top = self.since

    def take(self, tasks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        """The page's tasks not seen yet. Checks the page is in ascending order from
        ``since``: the next ``since`` is its highest updatedAt."""
        fresh = []
        last = self.since
        for task in tasks:
            updated = _updated_at(task)
            if updated is None:
                fresh.append(task)  # the store rejects it and says why
                continue
            if updated < last:
                raise BadResponse(
                    f"{where} did not answer in ascending updatedAt from {self.since} "
                    "(order or filters not honoured): stopping rather than skip tasks"
                )
            last = updated
            key = (str(task.get("id")), updated)
            if key not in self.seen:
                self.seen.add(key)
                fresh.append(task)
        self.top = max(self.top, last)
        return fresh

    def advance(self, page: Page, where: str) -> bool:
        """Move to the next request; False when there is nowhere to go."""
        if self.top > self.since:
            # Ask again from the highest updatedAt seen, from offset 0: no offset to skip
            # from. Rows below it will never come back: forget them.
            self.since, self.cursor = self.top, None
            self.seen = {key for key in self.seen if key[1] >= self.since}
            return True
        # A full page of one updatedAt: only Studio's cursor goes further.
        if page.cursor is None:
            log.warning(
                "reconcile: %s gave a full page of tasks all updated at %s and no cursor: "
                "the rest of them are not read in this pass",
                where,
                self.since,
            )
            return False
        self.cursor = page.cursor
        return True


def _updated_at(task: dict[str, Any]) -> int | float | None:
    status = task.get("status")
    value = status.get("updatedAt") if isinstance(status, dict) else None
    return value if is_number(value) else None


async def _fold(
    store: Store,
    tasks: list[dict[str, Any]],
    report: PassReport,
    repaired: set[str],
    on_changes: ChangeSink | None,
) -> None:
    result = await store.ingest_raw([orjson.dumps(t) for t in tasks], SOURCE, now_ms())
    report.seen += len(tasks)
    for task, outcome in zip(tasks, result.outcomes, strict=True):
        if isinstance(outcome, Rejected):
            report.rejected += 1
            log.warning(
                "reconcile: Studio task %r cannot be used: %s", task.get("id"), outcome.message
            )
        elif outcome is Outcome.ACCEPTED:
            report.new += 1
    if result.changes:
        new = {c.task_id for c in result.changes} - repaired
        repaired.update(new)
        report.repaired += len(new)
        if on_changes is not None:
            try:
                on_changes(result.changes)
            except Exception:
                # The changes are committed in the outbox; the dispatcher will find them.
                log.exception("change notification failed")


class ReconcileLoop:
    """A pass every ``interval_s`` (the first at start, or on taking the lease over), on
    the replica holding the ``reconcile`` lease. A failed pass is logged and counted, and
    the next one comes on the interval; a stop ends the pass after its page in flight."""

    def __init__(
        self,
        store: Store,
        client: Callable[[], StudioClient],
        *,
        interval_s: float,
        overlap_ms: int = 60_000,
        lease_s: float = 15.0,
        on_changes: ChangeSink | None = None,
        stop_grace_s: float = 5.0,
    ) -> None:
        if interval_s <= 0 or lease_s <= 0:
            raise ValueError("interval_s and lease_s must be positive")
        self._store = store
        self._make_client = client
        self._interval_s = interval_s
        self._overlap_ms = overlap_ms
        self._lease_ms = int(lease_s * 1000)
        self._renew_s = lease_s / 3
        self._on_changes = on_changes
        self._grace_s = stop_grace_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = ReconcileStats()
        self._client: StudioClient | None = None
        self._stopping = asyncio.Event()
        self._job: Job | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._client = self._make_client()
        self._task = asyncio.create_task(self._run(), name="reconcile")

    async def stop(self) -> None:
        self._stopping.set()
        if self._job is not None:
            self._job.stop.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=self._grace_s)
            if not done:  # stuck in a request or a retry's wait: nothing to keep there
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.close()
        if self.stats.leader:
            try:
                await self._store.release_lease(LEASE, self.owner)
            except Exception as exc:
                log.warning("could not release the reconcile lease: %s", describe_error(exc))
            self.stats.leader = False

    def status(self) -> dict[str, Any]:
        studio = self._client.stats if self._client is not None else None
        return self.stats.as_dict(
            studio.requests if studio else 0, dict(studio.errors) if studio else {}
        )

    async def _run(self) -> None:
        due = time.monotonic()
        while not self._stopping.is_set():
            leader = await self._hold_lease()
            if leader and time.monotonic() >= due:
                await self._pass()
                due = time.monotonic() + self._interval_s
            wait = min(self._renew_s, max(due - time.monotonic(), 0)) if leader else self._renew_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def _hold_lease(self) -> bool:
        try:
            holder = await self._store.acquire_lease(LEASE, self.owner, self._lease_ms, now_ms())
        except Exception as exc:
            log.warning("reconcile lease round failed: %s", describe_error(exc))
            holder = None
        leader = holder == self.owner
        if leader != self.stats.leader:
            log.info("reconcile: %s", "this replica reconciles" if leader else "another does")
        self.stats.leader = leader
        return leader

    async def _keep_lease(self, job: Job) -> None:
        """Renew the lease while a pass runs; a lease lost (a stall let another replica
        take it) ends the pass after its page in flight."""
        while True:
            await asyncio.sleep(self._renew_s)
            if not await self._hold_lease():
                log.warning("reconcile: lost the lease during a pass; stopping it")
                job.stop.set()
                return

    async def _pass(self) -> None:
        assert self._client is not None
        job = self._job = Job()
        keeper = asyncio.create_task(self._keep_lease(job), name="reconcile-lease")
        stats = self.stats
        try:
            report = await reconcile_pass(
                self._store,
                self._client,
                overlap_ms=self._overlap_ms,
                on_changes=self._on_changes,
                job=job,
            )
        except AuthError as exc:
            self._failed(str(exc))
            log.error("reconcile: %s", exc)  # one line naming the setting, no traceback
        except StudioError as exc:
            self._failed(str(exc))
            log.warning("reconcile pass failed: %s", exc)
        except Exception as exc:
            self._failed(describe_error(exc))
            log.exception("reconcile pass failed")
        else:
            stats.passes += 1
            stats.pages += report.pages
            stats.tasks_seen += report.seen
            stats.tasks_repaired += report.repaired
            if not report.interrupted:
                stats.last_success_ms = now_ms()
                stats.last_error = None
            log.info(
                "reconcile: %d page(s), %d task(s) seen, %d repaired",
                report.pages,
                report.seen,
                report.repaired,
            )
        finally:
            self._job = None
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    def _failed(self, message: str) -> None:
        self.stats.failed_passes += 1
        self.stats.last_error = message
