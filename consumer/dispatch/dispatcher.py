"""Deliver committed changes to handlers: in order per task, concurrently across tasks,
with retries, backoff, dead letters and a record of every delivery.

The outbox (the store's ``changes``, written in the same transaction as the state) is the
source of truth. For each handler (a :class:`~consumer.core.change.Subscription`) a *lane*
reads the outbox past its cursor, drops what the handler's filters do not want, and
queues the rest per task. One worker per task delivers that task's changes one at a time,
in ``seq`` order; at most ``concurrency`` handler calls run at once per lane.

Each (change, handler) ends in a delivery record written before the next change of that
task is delivered: ``done`` when the handler returned normally, ``dead`` when it raised
:class:`~consumer.core.change.PermanentError` or ran out of attempts or time. A change
with a ``done`` or ``dead`` record is never delivered again, across restarts, so a
handler that returned sees a change once; only a crash in the instant between a handler
returning and its record committing can repeat one (at least once, never lost).

Retries back off exponentially with full jitter. A slow or hung handler is cut off by
its timeout, and only ever occupies its own lane: ingestion never waits for dispatch, and
other handlers carry on. Each lane keeps at most ``max_backlog`` changes in memory and
reads more from the outbox as it drains. Dead letters are re-driven by moving them to
``redrive`` (CLI or API); the lane picks those up on its next poll.

Processes sharing one store elect one dispatcher through the store's ``dispatch`` lease;
a restart on the same host takes its own dead predecessor's lease at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from consumer.core.backoff import Backoff, Retries
from consumer.core.change import ChangeRecord, PhaseChange
from consumer.core.secrets import describe_error
from consumer.core.times import now_ms
from consumer.dispatch.policy import DeliveryPolicy
from consumer.dispatch.runner import HandlerThread
from consumer.dispatch.subscription import PermanentError, Subscription
from consumer.store.base import Delivery, DeliveryStatus, Store

__all__ = ["Dispatcher", "LaneStats", "call_with_retries"]

log = logging.getLogger(__name__)

_READ_BATCH = 500


@dataclass(slots=True)
class LaneStats:
    delivered: int = 0
    failures: int = 0  # failed attempts (each retry counts)
    dead: int = 0
    filtered: int = 0
    queued: int = 0  # changes in memory, waiting or in delivery
    in_flight: int = 0  # handler calls running now

    def as_dict(self) -> dict[str, int]:
        return {
            "delivered": self.delivered,
            "failures": self.failures,
            "dead": self.dead,
            "filtered": self.filtered,
            "queued": self.queued,
            "inFlight": self.in_flight,
        }


@dataclass(slots=True)
class _Item:
    record: ChangeRecord
    attempts: int = 0  # attempts already made (from a previous failing record, or 0)
    first_attempt_at: int | None = None
    redrive: bool = False


@dataclass(slots=True)
class _Lane:
    sub: Subscription
    slots: asyncio.Semaphore  # the policy's concurrency: handler calls at once
    cursor: int = 0  # every seq <= cursor is resolved
    scanned: int = 0  # highest seq read from the outbox
    queues: dict[str, deque[_Item]] = field(default_factory=dict)
    workers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    unresolved: set[int] = field(default_factory=set)
    stats: LaneStats = field(default_factory=LaneStats)
    saved_cursor: int = -1


class _Slot:
    """One delivery's hold on its lane's concurrency: taken at most once at a time."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = False

    async def take(self) -> None:
        if not self._held:
            await self._slots.acquire()
            self._held = True

    def give_back(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


# Waits while delivery records cannot be written: short first (a lock held by a
# neighbour), capped so that deliveries resume within seconds of the store coming back.
_RECORD_BACKOFF = Backoff(0.05, 5.0)


class _Recorder:
    """Group commit for delivery records: many workers, one store write per round."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[tuple[Delivery, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def record(self, delivery: Delivery) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((delivery, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                retries = Retries(_RECORD_BACKOFF)
                while True:
                    try:
                        await self._store.record_deliveries([d for d, _ in batch])
                        break
                    except Exception:
                        # Losing a 'done' would deliver the change again: keep trying.
                        log.exception("could not record %d deliveries; retrying", len(batch))
                        await asyncio.sleep(retries.failed())
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._flushing = None


class Dispatcher:
    def __init__(
        self,
        store: Store,
        subscriptions: Sequence[Subscription],
        *,
        poll_s: float = 1.0,
        max_backlog: int = 10_000,
        drain_s: float = 10.0,
    ) -> None:
        self._store = store
        self._lanes = [
            _Lane(sub, asyncio.Semaphore(sub.policy.concurrency)) for sub in subscriptions
        ]
        names = [lane.sub.name for lane in self._lanes]
        if len(set(names)) != len(names):
            raise ValueError(f"handler names must be unique: {names}")
        self._poll_s = poll_s
        self._max_backlog = max_backlog
        self._drain_s = drain_s
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        longest = max(
            (s.policy.timeout_s for s in subscriptions), default=DeliveryPolicy().timeout_s
        )
        # Long enough that a handler at its timeout never outlives the lease.
        self._lease_ms = int((2 * longest + 10) * 1000)
        self._lease_renewed = 0.0
        self._leader = False
        self._started = False  # on_start hooks were run: stop() runs the on_stop ones
        self._recorder = _Recorder(store)
        self._last_housekeeping = 0.0
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Each handler's own thread and loop (see consumer.dispatch.runner).
        self._threads = {lane.sub.name: HandlerThread(lane.sub.name) for lane in self._lanes}

    # ------------------------------------------------------------ lifecycle

    @property
    def subscriptions(self) -> list[Subscription]:
        return [lane.sub for lane in self._lanes]

    async def start(self) -> None:
        if not self._lanes:
            return  # nothing to deliver to; leave the outbox to processes with handlers
        self._started = True
        last = (await self._store.stats()).last_change_seq
        for lane in self._lanes:
            if await self._store.get_cursor(lane.sub.name) is None:
                # A new handler starts with what happens from now on (history is for
                # `phasewatch replay handlers` to back-fill on purpose). Set before any
                # ingestion starts, so nothing committed after this is skipped.
                await self._store.set_cursor(lane.sub.name, last)
            thread = self._threads[lane.sub.name]
            thread.start()
            await _start_handler(lane.sub, thread)
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="dispatch")

    async def stop(self) -> None:
        """Stop reading; let deliveries in flight finish for up to ``drain_s``; record
        nothing for the ones cut off (they are delivered again after a restart); then
        stop every handler, on the leader and on a standby alike (both started them)."""
        self._stopping.set()
        self._wake.set()
        await self._stop_loop()
        await self._drain()
        if self._leader:
            await self._save_cursors()
            await self._release_lease()
        await self._stop_handlers()

    async def _stop_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _drain(self) -> None:
        workers = [w for lane in self._lanes for w in lane.workers.values()]
        if not workers:
            return
        _, pending = await asyncio.wait(workers, timeout=self._drain_s)
        for worker in pending:
            worker.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _save_cursors(self) -> None:
        # Leader only: a standby's lanes never read the outbox, and saving their cursor
        # would move the leader's back to where the standby started.
        for lane in self._lanes:
            with contextlib.suppress(Exception):
                await self._save_cursor(lane)

    async def _release_lease(self) -> None:
        # A successor (a rolling restart) need not wait for the lease to expire.
        with contextlib.suppress(Exception):
            await self._store.release_lease("dispatch", self._owner)
        self._leader = False

    async def _stop_handlers(self) -> None:
        if not self._started:
            return
        self._started = False
        for lane in self._lanes:
            thread = self._threads[lane.sub.name]
            await _stop_handler(lane.sub, thread)
            await thread.stop()

    def notify(self, changes: Sequence[ChangeRecord]) -> None:
        """Called after a commit that recorded changes: a wake-up, the outbox has them.
        Not while every lane's backlog is full (a slow or blocked handler): there is no
        room to read them into, and a lane that drains wakes the loop itself."""
        del changes
        if any(lane.stats.queued < self._max_backlog for lane in self._lanes):
            self._wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "leader": self._leader,
            "handlers": {
                lane.sub.name: {
                    **lane.stats.as_dict(),
                    "cursor": lane.cursor,
                    "loopLagSeconds": round(self._threads[lane.sub.name].lag.seconds, 4),
                }
                for lane in self._lanes
            },
        }

    def pending(self, last_change_seq: int) -> int:
        """Changes this process still has to resolve: queued, or not read yet. 0 when it
        has no handlers or is not the dispatcher."""
        if not self._leader:
            return 0
        return sum(
            lane.stats.queued + max(0, last_change_seq - lane.scanned) for lane in self._lanes
        )

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while not self._stopping.is_set():
            # asyncio.timeout, not wait_for: no task made per wake-up, and there is one
            # per commit while handlers keep up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if not await self._hold_lease():
                    continue
                # Wake-ups come with every commit; re-drives and cursors need only a poll.
                now = time.monotonic()
                housekeeping = now - self._last_housekeeping >= self._poll_s
                if housekeeping:
                    self._last_housekeeping = now
                for lane in self._lanes:
                    if housekeeping:
                        await self._redrive(lane)
                        await self._save_cursor(lane)
                    await self._fill(lane)
            except Exception:
                log.exception("dispatch pass failed; retrying")

    async def _hold_lease(self) -> bool:
        now = time.monotonic()
        if self._leader and now - self._lease_renewed < self._lease_ms / 3000:
            return True
        holder = await self._store.acquire_lease("dispatch", self._owner, self._lease_ms, now_ms())
        if holder != self._owner and _dead_here(holder):
            # A crashed process on this host (a restart): no need to wait out its lease.
            holder = await self._store.acquire_lease(
                "dispatch", self._owner, self._lease_ms, now_ms(), take_from=holder
            )
        was_leader, self._leader = self._leader, holder == self._owner
        if self._leader:
            self._lease_renewed = now
            if not was_leader:
                await self._become_leader()
        elif was_leader:
            log.warning("lost the dispatch lease to %s; standing by", holder)
            await self._stand_down()
        return self._leader

    async def _become_leader(self) -> None:
        for lane in self._lanes:
            cursor = await self._store.get_cursor(lane.sub.name) or 0
            lane.cursor = lane.scanned = lane.saved_cursor = cursor
        log.info("dispatching to %d handler(s) as %s", len(self._lanes), self._owner)

    async def _stand_down(self) -> None:
        for lane in self._lanes:
            for worker in lane.workers.values():
                worker.cancel()
            await asyncio.gather(*lane.workers.values(), return_exceptions=True)
            lane.workers.clear()
            lane.queues.clear()
            lane.unresolved.clear()
            lane.stats.queued = 0

    async def _redrive(self, lane: _Lane) -> None:
        """Queue dead letters an operator moved to 'redrive' (attempts start again)."""
        redrive = await self._store.list_deliveries([DeliveryStatus.REDRIVE], lane.sub.name, 500)
        if not redrive:
            return
        records = {r.seq: r for r in await self._store.changes_by_seq([d.seq for d in redrive])}
        for d in redrive:
            if d.seq in records and d.seq not in lane.unresolved:
                lane.unresolved.add(d.seq)
                self._enqueue(lane, _Item(records[d.seq], redrive=True))

    async def _fill(self, lane: _Lane) -> None:
        """Queue outbox changes past the lane's scan point."""
        while lane.stats.queued < self._max_backlog and not self._stopping.is_set():
            room = min(_READ_BATCH, self._max_backlog - lane.stats.queued)
            batch = await self._store.changes_after(lane.scanned, room)
            if not batch:
                break
            known = await self._store.deliveries_for(lane.sub.name, [r.seq for r in batch])
            for record in batch:
                lane.scanned = record.seq
                prior = known.get(record.seq)
                if prior is not None and prior.status is not DeliveryStatus.FAILING:
                    continue  # resolved before a restart
                if not lane.sub.wants(
                    record.kind,
                    record.task_type,
                    record.previous_phase,
                    record.phase,
                ):
                    lane.stats.filtered += 1
                    continue
                lane.unresolved.add(record.seq)
                self._enqueue(
                    lane,
                    _Item(record, prior.attempts, prior.first_attempt_at)
                    if prior is not None
                    else _Item(record),
                )
            # Let requests in between read batches: filling a large backlog at once
            # would hold the receiver's loop for a long stretch.
            await asyncio.sleep(0)

    def _enqueue(self, lane: _Lane, item: _Item) -> None:
        task_id = item.record.task_id
        lane.queues.setdefault(task_id, deque()).append(item)
        lane.stats.queued += 1
        if task_id not in lane.workers:
            worker = asyncio.create_task(self._work(lane, task_id), name=f"deliver-{task_id}")
            lane.workers[task_id] = worker

    async def _save_cursor(self, lane: _Lane) -> None:
        # Computed here, once a poll, not per delivery: min() over a large backlog is O(n).
        lane.cursor = min(lane.unresolved) - 1 if lane.unresolved else lane.scanned
        if lane.cursor != lane.saved_cursor:
            await self._store.set_cursor(lane.sub.name, lane.cursor)
            lane.saved_cursor = lane.cursor

    # ------------------------------------------------------------ delivery

    async def _work(self, lane: _Lane, task_id: str) -> None:
        """Deliver one task's queued changes, in order, one at a time."""
        queue = lane.queues[task_id]
        try:
            while queue:
                item = queue[0]
                await self._deliver(lane, item)
                queue.popleft()
                lane.stats.queued -= 1
                lane.unresolved.discard(item.record.seq)
        finally:
            if not queue:
                lane.queues.pop(task_id, None)
            lane.workers.pop(task_id, None)
        if lane.stats.queued < self._max_backlog // 2:
            self._wake.set()  # room again: read more of the outbox

    async def _deliver(self, lane: _Lane, item: _Item) -> None:
        sub, record = lane.sub, item.record
        attempts = 0 if item.redrive else item.attempts
        first = (None if item.redrive else item.first_attempt_at) or now_ms()
        # The slot first, held from building the change through its first call: with a
        # backlog of thousands of tasks waiting on a slow or blocked handler, building
        # every change up front (validation, redaction) would spend the receiver's loop
        # on changes that cannot be delivered yet. Retries take a slot again each time,
        # so a change backing off holds none.
        slot = _Slot(lane.slots)
        await slot.take()
        try:
            change = PhaseChange.from_record(record, handler=sub.name)
            if sub.where is not None and not _safe_where(sub, change):
                lane.stats.filtered += 1
                return

            async def failed(attempt: int, error: str) -> None:
                lane.stats.failures += 1
                log.warning(
                    "handler %s failed on change %d (attempt %d): %s",
                    sub.name,
                    record.seq,
                    attempt,
                    error,
                    extra=_context(sub.name, record),
                )
                await self._record(
                    lane, item, DeliveryStatus.FAILING, attempt, first=first, error=error
                )

            thread = self._threads[sub.name]

            async def call(c: PhaseChange) -> None:
                await slot.take()
                lane.stats.in_flight += 1
                try:
                    # On the handler's own loop: this loop (the receiver's) only waits.
                    await thread.run(lambda: sub.fn(c), sub.policy.timeout_s)
                finally:
                    lane.stats.in_flight -= 1
                    slot.give_back()

            status, attempts, error = await call_with_retries(
                sub, change, call, attempts=attempts, first=first, on_failure=failed
            )
        finally:
            slot.give_back()
        await self._record(lane, item, status, attempts, first=first, error=error)

    async def _record(
        self,
        lane: _Lane,
        item: _Item,
        status: DeliveryStatus,
        attempts: int,
        *,
        first: int,
        error: str | None,
    ) -> None:
        delivery = Delivery(
            lane.sub.name, item.record.seq, status, attempts, first, now_ms(), error
        )
        # Awaited before the task's next change is delivered (order, and a 'done' must be
        # durable before we move on); concurrent records share one transaction.
        await self._recorder.record(delivery)
        if status is DeliveryStatus.DONE:
            lane.stats.delivered += 1
        elif status is DeliveryStatus.DEAD:
            lane.stats.dead += 1
            log.error(
                "change %d (%s -> %s of %s) dead-lettered for %s after %d attempt(s): %s",
                item.record.seq,
                item.record.previous_phase,
                item.record.phase,
                item.record.task_id,
                lane.sub.name,
                attempts,
                error,
                extra=_context(lane.sub.name, item.record),
            )


async def call_with_retries(
    sub: Subscription,
    change: PhaseChange,
    call: Callable[[PhaseChange], Awaitable[None]],
    *,
    attempts: int = 0,
    first: int,
    on_failure: Callable[[int, str], Awaitable[None]],
) -> tuple[DeliveryStatus, int, str | None]:
    """The delivery policy, shared by live dispatch and replays: call until the handler
    returns (DONE), raises PermanentError (DEAD), or runs out of attempts or age (DEAD),
    sleeping a jittered exponential backoff between failures. ``attempts`` already made
    (a restart mid-retry) count. Returns (status, attempts made, last error)."""
    while True:
        attempts += 1
        try:
            await call(change if attempts == 1 else _with_attempt(change, attempts))
        except asyncio.CancelledError:
            raise  # the dispatcher is stopping (or the call was cut off): not the handler's
        except PermanentError as exc:
            return DeliveryStatus.DEAD, attempts, _describe(exc)
        except BaseException as exc:
            # Any failure of user code is retried, never fatal: SystemExit and
            # KeyboardInterrupt from a handler too (see consumer.dispatch.runner).
            error = _describe(exc)
            if sub.policy.gives_up(attempts, (now_ms() - first) / 1000):
                return DeliveryStatus.DEAD, attempts, error
            await on_failure(attempts, error)
            await asyncio.sleep(sub.policy.backoff.delay(attempts))
            continue
        return DeliveryStatus.DONE, attempts, None


def _context(handler: str, record: ChangeRecord) -> dict[str, Any]:
    """What a log line about a delivery is about (fields of a JSON log line)."""
    return {
        "handler": handler,
        "task_id": record.task_id,
        "event_id": record.event_id,
        "seq": record.seq,
    }


def _with_attempt(change: PhaseChange, attempt: int) -> PhaseChange:
    return replace(change, attempt=attempt)


async def _start_handler(sub: Subscription, thread: HandlerThread) -> None:
    if sub.on_start is None:
        return
    try:
        await thread.run(sub.on_start, sub.policy.timeout_s)
    except Exception:
        # e.g. a broker down at start: the handler's calls fail and are retried like any
        # delivery; the service itself must still come up.
        log.exception("handler %s failed to start", sub.name)


async def _stop_handler(sub: Subscription, thread: HandlerThread) -> None:
    if sub.on_stop is None:
        return
    try:
        # Bounded: a handler stuck in a blocking call must not hold up the whole stop.
        await thread.run(sub.on_stop, min(sub.policy.timeout_s, 5.0))
    except Exception:
        # One handler failing to close must not keep the others' resources open.
        log.exception("handler %s failed to stop cleanly", sub.name)


def _safe_where(sub: Subscription, change: PhaseChange) -> bool:
    try:
        return sub.where is None or bool(sub.where(change))
    except Exception:
        log.exception("filter of handler %s raised on change %d; skipping it", sub.name, change.seq)
        return False


def _describe(exc: BaseException) -> str:
    """The error as logged and kept with a dead letter: URL credentials removed, since
    handler code may put a URL with userinfo in its message."""
    if isinstance(exc, TimeoutError):
        return "TimeoutError: timed out"
    return describe_error(exc, limit=2000)


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
