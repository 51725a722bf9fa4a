"""Rebuild the view from the stored history.

Reads the history task by task (a few hundred tasks at a time, so memory stays flat
whatever the history's size) and folds each task's events with the live path's fold
(:func:`~consumer.core.plan.plan_batch`) into a staged view, then swaps it in
atomically, after folding in whatever arrived meanwhile; ``check`` compares instead of
swapping. It fires no handlers. Interrupted, it keeps what it staged and a checkpoint;
run again, it continues from there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from consumer.core.codec import DecodeError, Event, decode
from consumer.core.fold import TaskState
from consumer.core.plan import plan_batch
from consumer.replay.job import Checkpoint, Interrupted, Job
from consumer.store.base import (
    HistoryEntry,
    HistoryStore,
    MetaStore,
    RebuildStore,
    ViewStore,
)

__all__ = ["Interrupted", "RebuildReport", "RebuildingStore", "fold_entries", "rebuild"]


@dataclass(slots=True)
class RebuildReport:
    tasks: int = 0
    events: int = 0
    undecodable: int = 0
    resumed: bool = False
    missing: list[str] = field(default_factory=list)  # --check: rebuilt, not in the view
    different: list[str] = field(default_factory=list)  # --check: differs from the view
    extra: int = 0  # --check: in the view, without history


def fold_entries(entries: Sequence[HistoryEntry]) -> tuple[dict[str, list[Event]], int]:
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
    await _fold_all(
        store,
        after=after,
        check=check,
        batch_tasks=batch_tasks,
        upto=upto,
        checkpoint=checkpoint,
        report=report,
        job=job,
        total=stats.tasks,
    )
    if check:
        report.extra = max(0, stats.tasks - (report.tasks - len(report.missing)))
    else:
        await store.swap_rebuilt(upto)
        await checkpoint.clear()
    return report


async def _read(
    store: RebuildingStore, after: str | None, batch_tasks: int, upto: int
) -> tuple[list[str], list[HistoryEntry]] | None:
    ids = await store.task_ids_after(after, batch_tasks)
    if not ids:
        return None
    return ids, await store.history_of_tasks(ids, upto)


async def _fold_all(
    store: RebuildingStore,
    *,
    after: str | None,
    check: bool,
    batch_tasks: int,
    upto: int,
    checkpoint: Checkpoint,
    report: RebuildReport,
    job: Job,
    total: int,
) -> None:
    """The batches of tasks after ``after``, folded and staged (``check``: compared)."""
    # One batch read ahead: the store reads the next tasks' history (on PostgreSQL, in
    # the server's process) while this one folds and stages the current ones.
    ahead = asyncio.ensure_future(_read(store, after, batch_tasks, upto))
    try:
        while (batch := await ahead) is not None:
            ids, entries = batch
            after = ids[-1]
            ahead = asyncio.ensure_future(_read(store, after, batch_tasks, upto))
            report.events += len(entries)
            by_task, bad = fold_entries(entries)
            report.undecodable += bad
            states = {t: s for t, evs in by_task.items() if (s := _fold_task(evs)) is not None}
            if check:
                await _compare(store, states, report)
            else:
                await store.stage_rebuilt(states)
            report.tasks += len(states)
            if not check:
                await checkpoint.save({"upto": upto, "after": after, "tasks": report.tasks})
            job.report(report.tasks, total)
            if job.batch_done():
                raise Interrupted(f"rebuild stopped after {report.tasks} tasks")
    finally:
        ahead.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ahead


async def _compare(store: ViewStore, states: dict[str, TaskState], report: RebuildReport) -> None:
    for task_id, state in states.items():
        live = await store.get_task(task_id)
        if live is None:
            report.missing.append(task_id)
        elif live.task != state.task:
            report.different.append(task_id)
