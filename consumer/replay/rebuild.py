"""Replays over the stored history: rebuild the view, and re-run handlers over a window.

Both read the history task by task (a few hundred tasks at a time, so memory stays flat
whatever the history's size) and run the same fold as live ingestion.

**Rebuild** folds every task's history into a staged view and swaps it in atomically,
after folding in whatever arrived meanwhile; ``check`` compares instead of swapping. It
fires no handlers. Interrupted, it keeps what it staged and a checkpoint; run again, it
continues from there.

**Replay handlers** computes the phase changes of the window from the *ordered* history
(each task's snapshots in fold order, as if they had arrived in order), and delivers
them to the chosen handlers marked ``replay=True``, with the same retry policy as live
dispatch. Replayed deliveries are recorded apart from live ones (``replay`` records), so
they neither suppress nor duplicate live deliveries. Interrupted, a re-run with the same
arguments continues after the last change it finished.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from consumer.core.change import PhaseChange
from consumer.core.codec import DecodeError, Event, decode
from consumer.core.fold import TaskState, order_key
from consumer.core.plan import NewChange, plan_batch
from consumer.core.times import now_ms
from consumer.dispatch.dispatcher import call_with_retries
from consumer.dispatch.subscription import Subscription
from consumer.replay.job import Checkpoint, Job
from consumer.store.base import (
    Delivery,
    DeliveryStatus,
    HistoryEntry,
    HistoryStore,
    MetaStore,
    OutboxStore,
    RebuildStore,
    ViewStore,
)

__all__ = [
    "Interrupted",
    "RebuildReport",
    "ReplayChange",
    "ReplayReport",
    "rebuild",
    "replay_changes",
    "replay_handlers",
    "run_key",
]

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Stopped on request; a checkpoint was saved and a re-run continues from it."""


@dataclass(slots=True)
class RebuildReport:
    tasks: int = 0
    events: int = 0
    undecodable: int = 0
    resumed: bool = False
    missing: list[str] = field(default_factory=list)  # --check: rebuilt, not in the view
    different: list[str] = field(default_factory=list)  # --check: differs from the view
    extra: int = 0  # --check: in the view, without history


def _fold_entries(entries: Sequence[HistoryEntry]) -> tuple[dict[str, list[Event]], int]:
    by_task: dict[str, list[Event]] = {}
    bad = 0
    for entry in entries:
        try:
            event = decode(entry.raw)
        except DecodeError:
            bad += 1  # accepted once, so this means the codec changed: counted, not fatal
            continue
        if event.task_id is not None:
            by_task.setdefault(event.task_id, []).append(event)
    return by_task, bad


def _fold_task(events: Sequence[Event]) -> TaskState | None:
    # The live path's fold (one batch of the task's whole history): no recorded changes.
    if not events:
        return None
    return plan_batch(events, (), {}, record_changes=False).states.get(str(events[0].task_id))


class RebuildingStore(HistoryStore, ViewStore, RebuildStore, MetaStore, Protocol):
    """What a rebuild needs: the history to fold, the view to compare with or replace,
    and a checkpoint."""


async def rebuild(
    store: RebuildingStore,
    *,
    check: bool = False,
    batch_tasks: int = 500,
    job: Job | None = None,
) -> RebuildReport:
    """Fold every task's history into a staged view and swap it in (``check``: compare
    with the live view instead). A long job: each batch of ``batch_tasks`` tasks is one
    step; stopped, it raises :class:`Interrupted` with its checkpoint saved."""
    job = job or Job()
    report = RebuildReport()
    stats = await store.stats()
    # Saved after every batch (every_s=0): a batch of tasks is a long step already.
    checkpoint = Checkpoint(store, "rebuild", every_s=0)
    point = None if check else await checkpoint.load()
    if point:
        upto, after, report.tasks = int(point["upto"]), point["after"], int(point["tasks"])
        report.resumed = True
    else:
        upto, after = stats.last_event_seq, None
        if not check:
            await store.discard_rebuilt()
    while True:
        ids = await store.task_ids_after(after, batch_tasks)
        if not ids:
            break
        entries = await store.history_of_tasks(ids, upto)
        report.events += len(entries)
        by_task, bad = _fold_entries(entries)
        report.undecodable += bad
        states = {t: s for t, evs in by_task.items() if (s := _fold_task(evs)) is not None}
        if check:
            await _compare(store, states, report)
        else:
            await store.stage_rebuilt(states)
        report.tasks += len(states)
        after = ids[-1]
        if not check:
            await checkpoint.save({"upto": upto, "after": after, "tasks": report.tasks})
        job.report(report.tasks, stats.tasks)
        if job.batch_done():
            raise Interrupted(f"rebuild stopped after {report.tasks} tasks")
    if check:
        report.extra = max(0, stats.tasks - (report.tasks - len(report.missing)))
    else:
        await store.swap_rebuilt(upto)
        await checkpoint.clear()
    return report


async def _compare(store: ViewStore, states: dict[str, TaskState], report: RebuildReport) -> None:
    for task_id, state in states.items():
        live = await store.get_task(task_id)
        if live is None:
            report.missing.append(task_id)
        elif live.task != state.task:
            report.different.append(task_id)


# ---------------------------------------------------------------- replay handlers


ReplayChange = NewChange
"""A phase change as the ordered history has it: what the fold would record for it."""


async def replay_changes(
    store: HistoryStore,
    *,
    since: int | float,
    until: int | float | None = None,
    task_id: str | None = None,
    phases: Sequence[str] = (),
    batch_tasks: int = 500,
) -> list[ReplayChange]:
    """Phase changes with ``since <= changed_at < until`` from the ordered history, in
    ``(changed_at, task, event)`` order."""
    upto = (await store.stats()).last_event_seq
    found: list[ReplayChange] = []
    after: str | None = None
    while True:
        ids = [task_id] if task_id is not None else await store.task_ids_after(after, batch_tasks)
        if not ids:
            break
        by_task, _ = _fold_entries(await store.history_of_tasks(ids, upto))
        for events in by_task.values():
            # The live path's fold over the history in fold order: the changes as if every
            # snapshot had arrived in order.
            ordered = sorted(events, key=order_key)
            for moved in plan_batch(ordered, (), {}).changes:
                if not since <= moved.changed_at:
                    continue
                if until is not None and moved.changed_at >= until:
                    continue
                if phases and moved.phase not in phases:
                    continue
                found.append(moved)
        if task_id is not None:
            break
        after = ids[-1]
    found.sort(key=lambda c: (c.changed_at, c.task_id, c.event_id))
    return found


@dataclass(slots=True)
class ReplayReport:
    changes: int = 0
    delivered: int = 0
    dead: int = 0
    skipped: int = 0  # not wanted by the handler's filters
    resumed_from: int = 0


class ReplayStore(OutboxStore, MetaStore, Protocol):
    """What replaying handlers needs: the outbox (live seqs, delivery records) and a
    checkpoint."""


async def replay_handlers(
    store: ReplayStore,
    subscriptions: Sequence[Subscription],
    changes: Sequence[ReplayChange],
    *,
    run_key: str,
    job: Job | None = None,
    call: Callable[[Subscription, PhaseChange], Awaitable[None]] | None = None,
) -> ReplayReport:
    """Deliver ``changes`` to each subscription (in order), recorded as replays. A long
    job: each change is one step; stopped, it raises :class:`Interrupted` with its
    checkpoint saved."""
    job = job or Job()
    report = ReplayReport(changes=len(changes))
    checkpoint = Checkpoint(store, f"replay-handlers:{run_key}", every_s=0)
    saved = await checkpoint.load()
    start = int(saved) if saved else 0
    report.resumed_from = start
    live_seqs = await _live_seqs(store, changes)

    async def invoke(sub: Subscription, change: PhaseChange) -> None:
        if call is not None:
            await call(sub, change)
        else:
            await asyncio.wait_for(sub.fn(change), sub.timeout_s)

    for index in range(start, len(changes)):
        c = changes[index]
        seq = live_seqs.get((c.task_id, c.event_id, c.phase)) or _synthetic_seq(c)
        change = PhaseChange.from_record(c.recorded(seq, 0), replay=True)
        for sub in subscriptions:
            if not sub.matches(change):
                report.skipped += 1
                continue
            first = now_ms()

            async def failed(attempt: int, error: str, name: str = sub.name) -> None:
                log.warning("replay to %s failed (attempt %d): %s", name, attempt, error)

            async def once(ch: PhaseChange, target: Subscription = sub) -> None:
                await invoke(target, ch)

            status, attempts, error = await call_with_retries(
                sub, change, once, first=first, on_failure=failed
            )
            await store.record_deliveries(
                [Delivery(sub.name, seq, status, attempts, first, now_ms(), error, replay=True)]
            )
            if status is DeliveryStatus.DONE:
                report.delivered += 1
            else:
                report.dead += 1
        await checkpoint.save(index + 1)
        job.report(index + 1, len(changes))
        if job.batch_done() and index + 1 < len(changes):
            raise Interrupted(f"replay stopped after {index + 1} of {len(changes)} changes")
    await checkpoint.clear()
    return report


async def _live_seqs(
    store: OutboxStore, changes: Sequence[ReplayChange]
) -> dict[tuple[str, str, str], int]:
    seqs: dict[tuple[str, str, str], int] = {}
    for task_id in {c.task_id for c in changes}:
        for record in await store.task_changes(task_id):
            seqs[(record.task_id, record.event_id, record.phase)] = record.seq
    return seqs


def _synthetic_seq(change: ReplayChange) -> int:
    """A stable negative id for a change the live outbox never had (it saw another order)."""
    digest = hashlib.sha256(f"{change.task_id}\0{change.event_id}\0{change.phase}".encode())
    return -int.from_bytes(digest.digest()[:7], "big") - 1


def run_key(**params: Any) -> str:
    """Identifies a replay by its arguments, so a re-run with the same ones resumes."""
    return hashlib.sha256(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
