"""Group commit: many concurrent submitters, one store transaction per batch.

A webhook request must not be acknowledged before its event is committed, and paying
one commit (one fsync) per request caps throughput at the disk's fsync rate. The
:class:`Ingestor` queues submissions; a single loop takes everything queued (up to
``max_batch``), commits it with one :meth:`Store.ingest_raw` call, and resolves every
submitter at once. With ``max_inflight`` > 1 the next batch is handed over while one
commits, for a store that queues batches to a writer of its own. Under load batches grow
by themselves; when idle, a lone event commits immediately (no timer, no added latency).

If a batch fails as a whole, its events are retried one by one so that one event the
store cannot take does not fail its neighbours.

Each submission may carry a :class:`~consumer.core.receipt.Receipt` (which webhook
secret verified it, the request's trace context); it goes to the store with its message,
by position, on the batch path and the one-by-one retry alike. With tracing on
(:mod:`consumer.tracing`) each commit is a ``store.commit`` span linked to the requests
whose receipts carry a trace context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from consumer import tracing
from consumer.core.change import ChangeRecord
from consumer.core.plan import Outcome
from consumer.core.receipt import Receipt
from consumer.core.secrets import describe_error
from consumer.core.times import now_ms
from consumer.store.base import RawIngestResult, Rejected, Store

__all__ = ["ChangeSink", "IngestStats", "Ingestor"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class IngestStats:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    failed: int = 0
    largest_batch: int = 0
    # Why the last commit failed, until one succeeds: /readyz answers 503 meanwhile.
    failing: str | None = None
    failing_bytes: int = 0  # the size of the message that failed, for the probe


@dataclass(slots=True)
class _Pending:
    raw: bytes
    future: asyncio.Future[Outcome | Rejected]
    receipt: Receipt | None = None


ChangeSink = Callable[[Sequence[ChangeRecord]], None]


class Ingestor:
    def __init__(
        self,
        store: Store,
        *,
        source: str,
        max_batch: int = 512,
        max_inflight: int = 1,
        on_changes: ChangeSink | None = None,
    ) -> None:
        self._store = store
        self._source = source
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._on_changes = on_changes
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.stats = IngestStats()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"ingest-{self._source}")

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def submit(self, raw: bytes, receipt: Receipt | None = None) -> Outcome | Rejected:
        """Resolve once the message is committed (or known to be a duplicate), or with
        what is wrong with it. Decoding is the store's work (see
        :meth:`Store.ingest_raw`), off this process with the default store. ``receipt``
        is kept with the message in the history (a duplicate keeps the first's)."""
        if self._task is None:
            raise RuntimeError("Ingestor is not started")
        future: asyncio.Future[Outcome | Rejected] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(raw, future, receipt))
        return await future

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self._max_inflight)
        batches: set[asyncio.Task[None]] = set()
        while True:
            # A batch starts when a slot is free and takes everything queued by then.
            await slots.acquire()
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            task = asyncio.create_task(self._commit_batch(batch, slots))
            batches.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(batches.discard)

    async def _commit_batch(self, batch: list[_Pending], slots: asyncio.Semaphore) -> None:
        try:
            await self._commit(batch)
        finally:
            slots.release()
            for _ in batch:
                self._queue.task_done()

    async def _commit(self, batch: list[_Pending]) -> None:
        receipts = [p.receipt for p in batch]
        try:
            # With tracing on, a store.commit span linked to the requests it carries; it
            # ends with this attempt (a one-by-one retry is a commit, and a span, of its own).
            with tracing.committing(self._source, receipts) as span:
                result = await self._store.ingest_raw(
                    [p.raw for p in batch],
                    self._source,
                    now_ms(),
                    # None when no message has one: what a store without receipts is given.
                    receipts=receipts if any(r is not None for r in receipts) else None,
                )
                span.committed(result.outcomes, len(result.changes))
        except Exception as exc:
            if len(batch) == 1:
                log.exception("store could not commit a message of %d bytes", len(batch[0].raw))
                self.stats.failed += 1
                self.stats.failing = describe_error(exc)
                self.stats.failing_bytes = len(batch[0].raw)
                _settle(batch[0].future, exc=RuntimeError("store unavailable"))
                return
            log.warning("batch of %d failed; retrying its events one by one", len(batch))
            for pending in batch:
                await self._commit([pending])
            return
        self.stats.batches += 1
        self.stats.failing = None
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for pending, outcome in zip(batch, result.outcomes, strict=True):
            if isinstance(outcome, Rejected):
                self.stats.rejected += 1
            elif outcome is Outcome.DUPLICATE:
                self.stats.duplicates += 1
            else:
                self.stats.accepted += 1
            _settle(pending.future, outcome)
        self._publish(result)

    def _publish(self, result: RawIngestResult) -> None:
        if result.changes and self._on_changes is not None:
            try:
                self._on_changes(result.changes)
            except Exception:
                # The changes are committed in the outbox; the dispatcher will find them.
                log.exception("change notification failed")


def _settle(
    future: asyncio.Future[Outcome | Rejected],
    outcome: Outcome | Rejected | None = None,
    exc: Exception | None = None,
) -> None:
    # The submitter may have gone away (client disconnected): its event is still committed.
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    elif outcome is not None:
        future.set_result(outcome)
