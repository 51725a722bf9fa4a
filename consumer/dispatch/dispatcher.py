"""Deliver committed changes to handlers: in order per task, concurrently across tasks,
with retries, backoff, dead letters and a record of every delivery; shared by every
process on one store, in lanes.

The outbox (the store's ``changes``, written in the same transaction as the state) is the
source of truth. For each handler (a :class:`~consumer.core.change.Subscription`) the
dispatcher reads the outbox past its cursor, drops what the handler's filters do not
want, and queues the rest per task. One worker per task delivers that task's changes one
at a time, in ``seq`` order; at most ``concurrency`` handler calls run at once per
handler.

Each (change, handler) ends in a delivery record written before the next change of that
task is delivered: ``done`` when the handler returned normally, ``dead`` when it raised
:class:`~consumer.core.change.PermanentError` or ran out of attempts or time. A change
with a ``done`` or ``dead`` record is never delivered again, across restarts, so a
handler that returned sees a change once. A call's concurrency slot is held until its
record is committed (records of concurrent calls share one transaction), so a crash can
repeat at most ``concurrency`` changes per handler: the ones called and not yet recorded
(at least once, never lost; each carries the same idempotency key every time).

Retries back off exponentially with full jitter. A slow or hung handler is cut off by
its timeout, and only ever occupies its own slots: ingestion never waits for dispatch,
and other handlers carry on. Each handler keeps at most ``max_backlog`` changes in memory
and reads more from the outbox as it drains. Dead letters are re-driven by moving them
to ``redrive`` (CLI or API); the holder of their lane picks them up on its next poll.

Lanes
-----
The outbox is split into ``lanes`` lanes by a stable hash of the task id
(:mod:`consumer.dispatch.lanes`). Each lane has a lease, ``dispatch:lane:<i>``, and one
holder at a time; a task is always in the same lane, so its changes are delivered in
order by one process at a time. Every process keeps a member lease
(``dispatch:member:<owner>``), reads all dispatch leases every ``poll_s`` (at most
``lease_s / 6``) and renews its own every ``lease_s / 3``. Rendezvous hashing over the
live members names each lane's preferred member: a process takes the lanes it is
preferred for when they are free or expired, takes a lane nobody has held for
``lease_s / 3`` whoever it is preferred for (coverage), and gives back a lane another
live member is preferred for once its calls in flight end (up to ``drain_s``, then cut
off and recorded nothing: the new holder delivers them again). A graceful stop hands
every lane over at once; after a crash (SIGKILL) the others take its lanes as their
leases expire, within ``lease_s`` (at once on the same host: a restart takes its dead
predecessor's leases).

Each (handler, lane) has a cursor, ``<handler>@<i>/<lanes>``, read from the store when
the lane is taken. One ``changes_after`` per handler reads from the lowest cursor among
the lanes held, and routes changes to their lanes; a lane not held is skipped (its
holder reads it). A note per handler in the store (``dispatch:cursors:<handler>``) says
which lane count its cursors are for and a *floor* every lane of it starts from at the
least: a store from before lanes starts every lane at the old single cursor; a change of
the lane count at the lowest cursor of the old lanes (delivery records keep what was done
from being delivered again); a new handler at the outbox's end when it first starts.
Cursors are saved every ``max(poll_s, lease_s / 3)`` and when a lane is handed over;
one lagging only makes a new holder re-read what its delivery records then skip.

A handler call may run longer than ``lease_s``: leases are renewed by a task of their
own, whatever handlers do. A holder that cannot renew a lane (the store unreachable, the
process stalled) cuts that lane's deliveries off ``0.8 * lease_s`` after its last renewal
began, before anyone may take it, and records nothing for them: the next holder delivers
them again. What cannot be stopped: a handler blocking its thread may still finish its
side effect; a record write already handed to the store may still commit; and the store
judges expiry by each reader's wall clock, so hosts' clocks must agree to within
``0.2 * lease_s``. There is no fencing token: those are redeliveries, never losses.

Processes configured with different lane counts (a rolling change of the setting) have
overlapping lanes: owner ids carry the count, the last one started is kept in the store
(``dispatch:lanes``), and only processes with that count (if one is alive) hold lanes; a
process starts delivering a lane only after a read, made after it took the lane, showed
no lane held with another count and the pre-lanes ``dispatch`` lease held by no
non-member (the holder of lane 0 keeps that lease too, so an older version started next
to lanes stands by).

How this extends to many replicas
---------------------------------
Keep ``lanes`` at least the number of replicas (the default 16 serves up to 16; a replica
beyond that holds none and stands by). When a member joins or leaves, rendezvous moves
only about ``1/n`` of the lanes, each after its calls in flight end. The store's load per
replica is one outbox read per handler per poll (or commit wake-up), one lease read per
poll, ``lanes / replicas + 1`` lease renewals every ``lease_s / 3``, and its lanes'
cursors every few seconds. All replicas must run the same handlers: a lane's holder
delivers it to its own.
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
from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from consumer import tracing
from consumer.core.backoff import Backoff, Retries
from consumer.core.change import ChangeRecord, PhaseChange
from consumer.core.secrets import describe_error
from consumer.core.times import now_ms
from consumer.dispatch.lanes import (
    LEASE_PREFIX,
    LEGACY_LEASE,
    LeaseView,
    Plan,
    cursor_name,
    lane_lease,
    lane_of,
    layout_of,
    member_lease,
    owner_id,
    plan,
)
from consumer.dispatch.runner import HandlerThread
from consumer.dispatch.subscription import PermanentError, Subscription
from consumer.store.base import Delivery, DeliveryStatus, Store

__all__ = ["Dispatcher", "HandlerStats", "LaneStats", "call_with_retries"]

log = logging.getLogger(__name__)

_READ_BATCH = 500
# A lane's deliveries are cut off this far into its lease when it was not renewed.
_CUT_OFF = 0.8
# Store notes: the lane count last started; per handler, its cursors' layout and floor.
_DESIRED_LANES = "dispatch:lanes"
_CURSORS_NOTE = "dispatch:cursors:"


@dataclass(slots=True)
class HandlerStats:
    delivered: int = 0
    failures: int = 0  # failed attempts (each retry counts)
    dead: int = 0
    filtered: int = 0
    in_flight: int = 0  # handler calls running now

    def as_dict(self, queued: int) -> dict[str, int]:
        return {
            "delivered": self.delivered,
            "failures": self.failures,
            "dead": self.dead,
            "filtered": self.filtered,
            "queued": queued,  # changes in memory, waiting or in delivery
            "inFlight": self.in_flight,
        }


LaneStats = HandlerStats  # the name before lanes


@dataclass(slots=True)
class _Item:
    record: ChangeRecord
    attempts: int = 0  # attempts already made (from a previous failing record, or 0)
    first_attempt_at: int | None = None
    redrive: bool = False


@dataclass(eq=False, slots=True)
class _Track:
    """One handler in one lane this process holds."""

    lane: int
    cursor_name: str
    scanned: int  # highest seq of this lane read from the outbox (or its cursor)
    saved: int  # the cursor as last saved
    queues: dict[str, deque[_Item]] = field(default_factory=dict)
    workers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)  # tasks in a call or awaiting its record
    unresolved: set[int] = field(default_factory=set)
    queued: int = 0
    closing: bool = False  # being handed over or stopped: start nothing more

    def cursor(self) -> int:
        """Every seq of this lane up to this one is resolved. O(backlog): computed when
        saved or shown, not per delivery."""
        return min(self.unresolved) - 1 if self.unresolved else self.scanned


@dataclass(eq=False, slots=True)
class _Feed:
    """One handler: its subscription, its concurrency, its figures, its held lanes."""

    sub: Subscription
    slots: asyncio.Semaphore  # the policy's concurrency: handler calls at once
    stats: HandlerStats = field(default_factory=HandlerStats)
    tracks: dict[int, _Track] = field(default_factory=dict)

    @property
    def queued(self) -> int:
        return sum(t.queued for t in self.tracks.values())


@dataclass(eq=False, slots=True)
class _Held:
    """A lane lease this process holds."""

    lane: int
    timer: asyncio.TimerHandle | None = None  # cuts the lane off unless renewed first
    active: bool = False  # its tracks are loaded: its changes are being delivered
    releasing: bool = False


class _Slot:
    """One delivery's hold on its handler's concurrency: taken at most once at a time."""

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


class _Lost(Exception):
    """The lane of a delivery was lost before its record was written: none is."""


_Entry = tuple[Delivery, Callable[[], bool], "asyncio.Future[None]"]


class _Recorder:
    """Group commit for delivery records: many workers, one store write per round. A
    record is written at once, or with the round under way's successor."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[_Entry] = []
        self._flushing: asyncio.Task[None] | None = None

    async def record(self, delivery: Delivery, valid: Callable[[], bool]) -> None:
        """Write ``delivery`` while ``valid()`` (its lane is still held); raise
        :class:`_Lost` when it no longer is. A caller cancelled before the write began
        takes its record back: a delivery cut off records nothing."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry: _Entry = (delivery, valid, future)
        self._pending.append(entry)
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        try:
            await future
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._pending.remove(entry)
            raise

    @staticmethod
    def _still_valid(batch: list[_Entry]) -> list[_Entry]:
        keep = []
        for entry in batch:
            if entry[1]():
                keep.append(entry)
            elif not entry[2].done():
                entry[2].set_exception(_Lost())
        return keep

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                retries = Retries(_RECORD_BACKOFF)
                while batch := self._still_valid(batch):
                    try:
                        await self._store.record_deliveries([d for d, _, _ in batch])
                        break
                    except Exception:
                        # Losing a 'done' would deliver the change again: keep trying.
                        log.exception("could not record %d deliveries; retrying", len(batch))
                        await asyncio.sleep(retries.failed())
                for _, _, future in batch:
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
        lanes: int = 16,
        lease_s: float = 15.0,
        poll_s: float = 1.0,
        max_backlog: int = 10_000,
        drain_s: float = 10.0,
    ) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, not {lanes}")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, not {lease_s}")
        self._store = store
        self._feeds = [
            _Feed(sub, asyncio.Semaphore(sub.policy.concurrency)) for sub in subscriptions
        ]
        names = [feed.sub.name for feed in self._feeds]
        if len(set(names)) != len(names):
            raise ValueError(f"handler names must be unique: {names}")
        self._lanes = lanes
        self._lease_s = lease_s
        self._lease_ms = int(lease_s * 1000)
        self._poll_s = poll_s
        # Lease rounds: often enough that a renewal due at lease_s / 3 gets two tries
        # before the lane is cut off.
        self._round_s = min(poll_s, lease_s / 6)
        self._max_backlog = max_backlog
        self._drain_s = drain_s
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._owner = owner_id(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8], lanes)
        self._held: dict[int, _Held] = {}
        self._releases: dict[int, asyncio.Task[None]] = {}
        self._free_since: dict[int, float] = {}
        self._leases: dict[str, str] = {}  # the last read: lease name -> holder
        self._members: frozenset[str] = frozenset()
        self._renewed = float("-inf")
        self._started = False  # on_start hooks were run: stop() runs the on_stop ones
        self._recorder = _Recorder(store)
        self._last_housekeeping = 0.0
        self._cursors_saved = 0.0
        # Each handler's own thread and loop (see consumer.dispatch.runner).
        self._threads = {feed.sub.name: HandlerThread(feed.sub.name) for feed in self._feeds}

    # ------------------------------------------------------------ lifecycle

    @property
    def subscriptions(self) -> list[Subscription]:
        return [feed.sub for feed in self._feeds]

    async def start(self) -> None:
        if not self._feeds:
            return  # nothing to deliver to; leave the outbox to processes with handlers
        self._started = True
        last = (await self._store.stats()).last_change_seq
        # The last process started says how many lanes there are (see the docstring).
        if await self._store.get_meta(_DESIRED_LANES) != str(self._lanes):
            await self._store.set_meta(_DESIRED_LANES, str(self._lanes))
        for feed in self._feeds:
            name = feed.sub.name
            if await self._store.get_meta(_CURSORS_NOTE + name) is None:
                # A store from before lanes: every lane starts at the old cursor. A new
                # handler starts with what happens from now on (history is for
                # `phasewatch replay handlers` to back-fill on purpose). Set before any
                # ingestion starts, so nothing committed after this is skipped.
                old = await self._store.get_cursor(name)
                await self._note_cursors(name, last if old is None else old)
            thread = self._threads[name]
            thread.start()
            await _start_handler(feed.sub, thread)
        # One round now: a process alone on its store holds its lanes once started.
        try:
            await self._coordinate()
        except Exception:
            log.exception("dispatch lease round failed; retrying")
        self._wake.set()
        self._lease_task = asyncio.create_task(self._keep_leases(), name="dispatch-leases")
        self._task = asyncio.create_task(self._run(), name="dispatch")

    async def stop(self) -> None:
        """Stop reading; let the calls in flight finish for up to ``drain_s``; record
        nothing for the ones cut off (they are delivered again by the lane's next
        holder); save the cursors, hand every lane over; then stop every handler."""
        self._stopping.set()
        self._wake.set()
        await self._stop_tasks()
        await self._drain(self._feeds, set(self._held))
        for feed in self._feeds:
            for track in list(feed.tracks.values()):
                with contextlib.suppress(Exception):
                    await self._save_cursor(track)
        if self._started:  # it joined (it has handlers, and has not crashed)
            await self._release_all()
        await self._stop_handlers()

    async def _crash(self) -> None:
        """For tests: end like a SIGKILL would. Deliveries stop where they are; nothing
        more is recorded or saved; no lease is released (the others wait them out)."""
        self._stopping.set()
        await self._stop_tasks()
        workers = [
            w for feed in self._feeds for t in feed.tracks.values() for w in t.workers.values()
        ]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for held in self._held.values():
            if held.timer is not None:
                held.timer.cancel()
        self._held.clear()
        for feed in self._feeds:
            feed.tracks.clear()
        self._started = False  # a killed process runs no on_stop
        for thread in self._threads.values():
            await thread.stop()

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (self._task, self._lease_task, *self._releases.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._lease_task = None
        self._releases.clear()

    async def _drain(self, feeds: Sequence[_Feed], lanes: Set[int]) -> None:
        """End the deliveries of ``lanes``: waiting ones at once, calls in flight (and
        their records) within ``drain_s``, then cut off."""
        workers: list[asyncio.Task[None]] = []
        for feed in feeds:
            for lane in lanes:
                track = feed.tracks.get(lane)
                if track is None:
                    continue
                track.closing = True
                for task_id, worker in track.workers.items():
                    if task_id not in track.busy:
                        worker.cancel()  # not in a call: nothing to wait for
                    workers.append(worker)
        if not workers:
            return
        _, pending = await asyncio.wait(workers, timeout=self._drain_s)
        for worker in pending:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    async def _release_all(self) -> None:
        # Successors (a rolling restart, the other replicas) need not wait for expiry.
        # Every lane's lease by name (a release frees only this owner's): one taken by a
        # lease round that the stop interrupted is freed too.
        for held in self._held.values():
            if held.timer is not None:
                held.timer.cancel()
        self._held.clear()
        names = [
            member_lease(self._owner),
            LEGACY_LEASE,
            *(lane_lease(lane) for lane in range(self._lanes)),
        ]
        for feed in self._feeds:
            feed.tracks.clear()
        results = await asyncio.gather(
            *(self._store.release_lease(name, self._owner) for name in names),
            return_exceptions=True,
        )
        if any(isinstance(r, Exception) for r in results):
            log.warning("could not release every dispatch lease; they expire in %gs", self._lease_s)

    async def _stop_handlers(self) -> None:
        if not self._started:
            return
        self._started = False
        for feed in self._feeds:
            thread = self._threads[feed.sub.name]
            await _stop_handler(feed.sub, thread)
            await thread.stop()

    def notify(self, changes: Sequence[ChangeRecord]) -> None:
        """Called after a commit that recorded changes: a wake-up, the outbox has them.
        Not while every handler's backlog is full (a slow or blocked handler): there is
        no room to read them into, and a handler that drains wakes the loop itself."""
        del changes
        if any(feed.queued < self._max_backlog for feed in self._feeds):
            self._wake.set()

    def status(self) -> dict[str, Any]:
        held = sorted(lane for lane, h in self._held.items() if h.active)
        # Taken, not delivered yet: a lane of another lane count is still held elsewhere.
        waiting = sorted(lane for lane, h in self._held.items() if not h.active)
        handlers: dict[str, Any] = {}
        for feed in self._feeds:
            cursors = [t.cursor() for t in feed.tracks.values()]
            handlers[feed.sub.name] = {
                **feed.stats.as_dict(feed.queued),
                # The lowest cursor among the lanes held (None: none held).
                "cursor": min(cursors) if cursors else None,
                "loopLagSeconds": round(self._threads[feed.sub.name].lag.seconds, 4),
            }
        return {
            "leader": bool(held),  # delivers at least one lane
            "owner": self._owner,
            "lanes": {
                "count": self._lanes,
                "held": held,
                "waiting": waiting,
                "members": len(self._members),
            },
            "handlers": handlers,
        }

    def pending(self, last_change_seq: int) -> int:
        """Changes of the lanes this process holds that it still has to resolve: queued,
        or not read yet (estimated: a lane's share of the outbox past where it read). 0
        when it has no handlers or holds no lane."""
        total = 0
        for feed in self._feeds:
            if not feed.tracks:
                continue
            unread = sum(max(0, last_change_seq - t.scanned) for t in feed.tracks.values())
            total += feed.queued - (-unread // self._lanes)
        return total

    # ------------------------------------------------------------ leases

    async def _keep_leases(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self._round_s)
            try:
                await self._coordinate()
            except Exception:
                log.exception("dispatch lease round failed; retrying")

    async def _coordinate(self) -> None:
        """One lease round: renew when due, read every dispatch lease, then take, give
        back and start delivering lanes as :func:`~consumer.dispatch.lanes.plan` says."""
        now = time.monotonic()
        if now - self._renewed >= self._lease_s / 3:
            await self._renew(now)
        decision = await self._plan()
        for lane in decision.lost:
            self._lose(lane, "the store shows it held by another")
        for lane in decision.give_back:
            self._give_back(lane)
        if decision.take and await self._take(decision.take):
            # Deliver a lane only after a read made after taking it (see the docstring).
            decision = await self._plan()
            for lane in decision.lost:
                self._lose(lane, "the store shows it held by another")
        if not decision.clear:
            return
        for lane, held in list(self._held.items()):
            if not held.active and not held.releasing and lane not in decision.give_back:
                await self._activate(held)

    async def _renew(self, now: float) -> None:
        held = list(self._held.values())
        names = [member_lease(self._owner), *(lane_lease(h.lane) for h in held)]
        if 0 in self._held:
            names.append(LEGACY_LEASE)
        # One transaction for all of them: one lease write each was up to 18 commits
        # every round, and the delivery records queued behind them (a p99 of hundreds of
        # ms from webhook to handler in bench/dispatch_latency.py).
        results: list[str | BaseException]
        try:
            results = list(
                await self._store.acquire_leases(names, self._owner, self._lease_ms, now_ms())
            )
        except Exception as exc:
            log.warning("could not renew %d dispatch lease(s): %s", len(names), exc)
            results = [exc] * len(names)
        else:
            self._renewed = now
        for h, result in zip(held, results[1 : 1 + len(held)], strict=True):
            if self._held.get(h.lane) is not h or isinstance(result, BaseException):
                continue
            if result == self._owner:
                self._schedule_cut_off(h, now)
            else:
                self._lose(h.lane, f"taken by {result}")

    async def _plan(self) -> Plan:
        leases = await self._store.lease_holders(LEASE_PREFIX, now_ms())
        self._leases = leases
        view = LeaseView.of(leases, gone=self._gone)
        # A lane the store shows as ours that we no longer count (cut off while its
        # renewal was under way): free to take again.
        holders = {
            lane: holder
            for lane, holder in view.holders.items()
            if holder != self._owner or lane in self._held
        }
        view = replace(view, holders=holders)
        self._members = view.members | {self._owner}
        desired: int | None = None
        if len({layout_of(m) for m in self._members}) > 1:
            note = await self._store.get_meta(_DESIRED_LANES)
            desired = int(note) if note and note.isdigit() else None
        now = time.monotonic()
        long_free = set()
        for lane in range(self._lanes):
            if lane in holders:
                self._free_since.pop(lane, None)
            elif now - self._free_since.setdefault(lane, now) >= self._lease_s / 3:
                long_free.add(lane)
        return plan(
            self._owner,
            self._lanes,
            view,
            held=set(self._held),
            desired=desired,
            long_free=long_free,
        )

    def _gone(self, owner: str) -> bool:
        return owner != self._owner and _dead_here(owner)

    async def _take(self, lanes: Set[int]) -> list[int]:
        async def take(lane: int) -> bool:
            name = lane_lease(lane)
            prior = self._leases.get(name)
            now = time.monotonic()
            holder = await self._store.acquire_lease(
                name,
                self._owner,
                self._lease_ms,
                now_ms(),
                take_from=prior if prior is not None and self._gone(prior) else None,
            )
            if holder != self._owner or lane in self._held or self._stopping.is_set():
                return False
            held = self._held[lane] = _Held(lane)
            self._schedule_cut_off(held, now)
            if lane == 0:
                await self._take_legacy()
            return True

        wanted = sorted(lanes)
        results = await asyncio.gather(*(take(lane) for lane in wanted), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.warning("could not take %d dispatch lane(s): %s", len(errors), errors[0])
        taken = [lane for lane, ok in zip(wanted, results, strict=True) if ok is True]
        if taken:
            log.info("took dispatch lane(s) %s as %s", taken, self._owner)
        return taken

    async def _take_legacy(self) -> None:
        """The lease of versions before lanes, with lane 0: such a process stands by."""
        prior = self._leases.get(LEGACY_LEASE)
        with contextlib.suppress(Exception):
            await self._store.acquire_lease(
                LEGACY_LEASE,
                self._owner,
                self._lease_ms,
                now_ms(),
                take_from=prior if prior is not None and self._gone(prior) else None,
            )

    def _schedule_cut_off(self, held: _Held, renewed_at: float) -> None:
        if held.timer is not None:
            held.timer.cancel()
        delay = renewed_at + _CUT_OFF * self._lease_s - time.monotonic()
        held.timer = asyncio.get_running_loop().call_later(delay, self._cut_off, held)

    def _cut_off(self, held: _Held) -> None:
        if self._held.get(held.lane) is held:
            self._lose(held.lane, f"not renewed within {_CUT_OFF * self._lease_s:g}s")

    def _lose(self, lane: int, why: str) -> None:
        """Stop delivering ``lane`` at once: its lease is gone, or about to be."""
        held = self._held.pop(lane, None)
        if held is None:
            return
        if held.timer is not None:
            held.timer.cancel()
        cut = 0
        for feed in self._feeds:
            track = feed.tracks.pop(lane, None)
            if track is None:
                continue
            for worker in track.workers.values():
                worker.cancel()
            cut += len(track.busy)
        log.warning(
            "lost dispatch lane %d (%s): %d call(s) in flight cut off, recorded nothing; "
            "the lane's next holder delivers them again",
            lane,
            why,
            cut,
        )

    def _give_back(self, lane: int) -> None:
        held = self._held.get(lane)
        if held is None or held.releasing:
            return
        held.releasing = True
        task = asyncio.create_task(self._hand_over(held), name=f"dispatch-release-{lane}")
        self._releases[lane] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._releases.get(lane) is finished:
                del self._releases[lane]

        task.add_done_callback(done)

    async def _hand_over(self, held: _Held) -> None:
        """Give ``held`` back to its preferred member: its calls in flight end first."""
        lane = held.lane
        await self._drain(self._feeds, {lane})
        if self._held.get(lane) is not held:
            return  # lost meanwhile: nothing to save
        for feed in self._feeds:
            track = feed.tracks.get(lane)
            if track is not None:
                with contextlib.suppress(Exception):
                    await self._save_cursor(track)
        if self._held.get(lane) is not held:
            return
        del self._held[lane]
        if held.timer is not None:
            held.timer.cancel()
        for feed in self._feeds:
            feed.tracks.pop(lane, None)
        names = [lane_lease(lane), *([LEGACY_LEASE] if lane == 0 else [])]
        with contextlib.suppress(Exception):
            for name in names:
                await self._store.release_lease(name, self._owner)
        log.info("handed dispatch lane %d over", lane)

    async def _activate(self, held: _Held) -> None:
        """Start delivering a lane taken: each handler from its cursor in the store."""
        lane = held.lane
        starts = [await self._lane_start(feed.sub.name, lane) for feed in self._feeds]
        if self._held.get(lane) is not held or held.releasing or self._stopping.is_set():
            return
        for feed, start in zip(self._feeds, starts, strict=True):
            name = cursor_name(feed.sub.name, lane, self._lanes)
            feed.tracks[lane] = _Track(lane, name, scanned=start, saved=start)
        held.active = True
        self._wake.set()

    # ------------------------------------------------------------ cursors

    async def _note_cursors(self, handler: str, floor: int) -> None:
        note = orjson.dumps({"lanes": self._lanes, "floor": floor}).decode()
        await self._store.set_meta(_CURSORS_NOTE + handler, note)

    async def _floor(self, handler: str) -> int:
        """Where every lane of ``handler`` starts at the least, moving its cursors over
        to this lane count when they were kept for another one."""
        raw = await self._store.get_meta(_CURSORS_NOTE + handler)
        if raw is None:  # the note went missing: as at a first start
            old = await self._store.get_cursor(handler)
            floor = (await self._store.stats()).last_change_seq if old is None else old
            await self._note_cursors(handler, floor)
            return floor
        note = orjson.loads(raw)
        lanes, floor = int(note["lanes"]), int(note["floor"])
        if lanes == self._lanes:
            return floor
        # Their lanes are held no more (a lane is delivered only with no foreign one
        # held), so their cursors are final: resume every new lane at the lowest.
        olds = [await self._store.get_cursor(cursor_name(handler, i, lanes)) for i in range(lanes)]
        moved = min(floor if c is None else max(c, floor) for c in olds)
        await self._note_cursors(handler, moved)
        log.info(
            "handler %s: from %d lanes to %d; every lane resumes past change %d",
            handler,
            lanes,
            self._lanes,
            moved,
            extra={"handler": handler},
        )
        return moved

    async def _lane_start(self, handler: str, lane: int) -> int:
        floor = await self._floor(handler)
        own = await self._store.get_cursor(cursor_name(handler, lane, self._lanes))
        # Both are true of the lane (everything up to them resolved): the later one.
        return floor if own is None else max(own, floor)

    async def _save_cursor(self, track: _Track) -> None:
        cursor = track.cursor()
        if cursor != track.saved:
            await self._store.set_cursor(track.cursor_name, cursor)
            track.saved = cursor

    async def _save_cursors(self, tracks: Sequence[_Track]) -> None:
        """The moved cursors of ``tracks``, in one transaction (one per lane was a commit
        each, every round)."""
        moved = {t: t.cursor() for t in tracks}
        moved = {t: c for t, c in moved.items() if c != t.saved}
        if not moved:
            return
        await self._store.set_cursors({t.cursor_name: c for t, c in moved.items()})
        for track, cursor in moved.items():
            track.saved = cursor

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
                # Wake-ups come with every commit; re-drives and cursors need only a poll.
                now = time.monotonic()
                housekeeping = now - self._last_housekeeping >= self._poll_s
                if housekeeping:
                    self._last_housekeeping = now
                save = now - self._cursors_saved >= max(self._poll_s, self._lease_s / 3)
                if save:
                    self._cursors_saved = now
                for feed in self._feeds:
                    if not feed.tracks:
                        continue
                    if housekeeping:
                        await self._redrive(feed)
                    if save:
                        await self._save_cursors(list(feed.tracks.values()))
                    await self._fill(feed)
            except Exception:
                log.exception("dispatch pass failed; retrying")

    def _reading(self, feed: _Feed, track: _Track) -> bool:
        return feed.tracks.get(track.lane) is track and not track.closing

    async def _redrive(self, feed: _Feed) -> None:
        """Queue dead letters an operator moved to 'redrive' (attempts start again), of
        the lanes held."""
        name = feed.sub.name
        redrive = await self._store.list_deliveries([DeliveryStatus.REDRIVE], name, 500)
        if not redrive:
            return
        records = {r.seq: r for r in await self._store.changes_by_seq([d.seq for d in redrive])}
        for d in redrive:
            record = records.get(d.seq)
            if record is None:
                continue
            track = feed.tracks.get(lane_of(record.task_id, self._lanes))
            if track is None or track.closing or d.seq in track.unresolved:
                continue
            track.unresolved.add(d.seq)
            self._enqueue(feed, track, _Item(record, redrive=True))

    async def _fill(self, feed: _Feed) -> None:
        """Queue outbox changes of the lanes held past where each was read: one read
        from the lowest of them, each change routed to its lane."""
        sub = feed.sub
        while feed.queued < self._max_backlog and not self._stopping.is_set():
            tracks = [t for t in feed.tracks.values() if not t.closing]
            if not tracks:
                break
            room = min(_READ_BATCH, self._max_backlog - feed.queued)
            batch = await self._store.changes_after(min(t.scanned for t in tracks), room)
            if not batch:
                break
            by_lane = {t.lane: t for t in tracks}
            wanted: list[tuple[_Track, ChangeRecord]] = []
            for record in batch:
                track = by_lane.get(lane_of(record.task_id, self._lanes))
                if track is None or record.seq <= track.scanned:
                    continue  # a lane held elsewhere, or read already
                if not sub.wants(
                    record.kind, record.task_type, record.previous_phase, record.phase
                ):
                    feed.stats.filtered += 1
                    continue
                wanted.append((track, record))
            known = (
                await self._store.deliveries_for(sub.name, [r.seq for _, r in wanted])
                if wanted
                else {}
            )
            for track, record in wanted:
                if not self._reading(feed, track):
                    continue  # handed over or lost while reading
                prior = known.get(record.seq)
                if prior is not None and prior.status is not DeliveryStatus.FAILING:
                    continue  # resolved before a restart or a takeover
                track.unresolved.add(record.seq)
                self._enqueue(
                    feed,
                    track,
                    _Item(record, prior.attempts, prior.first_attempt_at)
                    if prior is not None
                    else _Item(record),
                )
            # The read covered every held lane from its scan point up to here. Not a lane
            # handed over or lost while it read: its changes above were skipped, and a
            # scan point moved past them would be saved as its cursor, so the next holder
            # would start past changes nobody delivered (seen as a lost change after a
            # hand-over in tests/process/test_replicas.py).
            for track in tracks:
                if self._reading(feed, track):
                    track.scanned = max(track.scanned, batch[-1].seq)
            # Let requests in between read batches: filling a large backlog at once
            # would hold the receiver's loop for a long stretch.
            await asyncio.sleep(0)

    def _enqueue(self, feed: _Feed, track: _Track, item: _Item) -> None:
        task_id = item.record.task_id
        track.queues.setdefault(task_id, deque()).append(item)
        track.queued += 1
        if task_id not in track.workers:
            worker = asyncio.create_task(
                self._work(feed, track, task_id), name=f"deliver-{task_id}"
            )
            track.workers[task_id] = worker

    # ------------------------------------------------------------ delivery

    async def _work(self, feed: _Feed, track: _Track, task_id: str) -> None:
        """Deliver one task's queued changes, in order, one at a time."""
        queue = track.queues[task_id]
        try:
            while queue and not track.closing:
                item = queue[0]
                await self._deliver(feed, track, task_id, item)
                queue.popleft()
                track.queued -= 1
                track.unresolved.discard(item.record.seq)
        except _Lost:
            return  # the lane went while its record waited: its next holder delivers it
        finally:
            if not queue:
                track.queues.pop(task_id, None)
            track.workers.pop(task_id, None)
        if feed.queued < self._max_backlog // 2:
            self._wake.set()  # room again: read more of the outbox

    async def _deliver(self, feed: _Feed, track: _Track, task_id: str, item: _Item) -> None:
        sub, record = feed.sub, item.record
        attempts = 0 if item.redrive else item.attempts
        first = (None if item.redrive else item.first_attempt_at) or now_ms()
        # The slot first, held from building the change through its first call: with a
        # backlog of thousands of tasks waiting on a slow or blocked handler, building
        # every change up front (validation, redaction) would spend the receiver's loop
        # on changes that cannot be delivered yet. A failed call gives it back, so a
        # change backing off holds none; a call that returned keeps it until its record
        # is committed, so that at most `concurrency` changes were called and not
        # recorded at any time: all a crash can deliver twice.
        slot = _Slot(feed.slots)
        await slot.take()
        try:
            change = PhaseChange.from_record(record, handler=sub.name)
            if sub.where is not None and not _safe_where(sub, change):
                feed.stats.filtered += 1
                return

            async def failed(attempt: int, error: str) -> None:
                feed.stats.failures += 1
                log.warning(
                    "handler %s failed on change %d (attempt %d): %s",
                    sub.name,
                    record.seq,
                    attempt,
                    error,
                    extra=_context(sub.name, record),
                )
                await self._record(
                    feed, track, item, DeliveryStatus.FAILING, attempt, first=first, error=error
                )

            thread = self._threads[sub.name]

            async def call(c: PhaseChange) -> None:
                await slot.take()
                track.busy.add(task_id)
                feed.stats.in_flight += 1
                try:
                    # With tracing on, a handler.deliver span per attempt: current where
                    # the handler runs, and the change's traceparent.
                    with tracing.delivering(sub.name, c) as span:
                        # On the handler's own loop: this loop (the receiver's) only waits.
                        await thread.run(span.call(sub.fn, c), sub.policy.timeout_s)
                except BaseException:
                    track.busy.discard(task_id)
                    slot.give_back()
                    raise
                finally:
                    feed.stats.in_flight -= 1

            status, attempts, error = await call_with_retries(
                sub, change, call, attempts=attempts, first=first, on_failure=failed
            )
            await self._record(feed, track, item, status, attempts, first=first, error=error)
        finally:
            track.busy.discard(task_id)
            slot.give_back()

    async def _record(
        self,
        feed: _Feed,
        track: _Track,
        item: _Item,
        status: DeliveryStatus,
        attempts: int,
        *,
        first: int,
        error: str | None,
    ) -> None:
        name = feed.sub.name
        delivery = Delivery(name, item.record.seq, status, attempts, first, now_ms(), error)
        # Awaited before the task's next change is delivered (order, and a 'done' must be
        # durable before we move on); concurrent records share one transaction. Written
        # only while the lane is held.
        await self._recorder.record(delivery, lambda: feed.tracks.get(track.lane) is track)
        if status is DeliveryStatus.DONE:
            feed.stats.delivered += 1
        elif status is DeliveryStatus.DEAD:
            feed.stats.dead += 1
            log.error(
                "change %d (%s -> %s of %s) dead-lettered for %s after %d attempt(s): %s",
                item.record.seq,
                item.record.previous_phase,
                item.record.phase,
                item.record.task_id,
                name,
                attempts,
                error,
                extra=_context(name, item.record),
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
    """Whether a lease owner ``host:pid:...`` is a process of this host that has exited."""
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
