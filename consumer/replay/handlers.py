"""Re-run handlers over a window of the stored history (``phasewatch replay handlers``).

:func:`replay_changes` computes the phase changes of the window from the *ordered*
history (each task's snapshots in fold order, as if they had arrived in order) with the
live path's fold; :func:`replay_handlers` delivers them to the chosen handlers marked
``replay=True``, with the same retry policy as live dispatch. Replayed deliveries are
recorded apart from live ones (``replay`` records), so they neither suppress nor
duplicate live deliveries. Interrupted, a re-run with the same arguments continues
after the last change it finished.

Each run has a run id of its own (random, kept in the checkpoint so that a resumed run
keeps it, and dropped when the run completes), which goes into every replayed change's
``idempotency_key``: a receiver that deduplicates on it tells a replay from the live
delivery and from other replays, while a retry within one run keeps its key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from consumer.core.change import PhaseChange
from consumer.core.fold import order_key
from consumer.core.plan import NewChange, plan_batch
from consumer.core.times import now_ms
from consumer.dispatch.dispatcher import call_with_retries
from consumer.dispatch.subscription import Subscription
from consumer.replay.job import Checkpoint, Interrupted, Job
from consumer.replay.rebuild import fold_entries
from consumer.store.base import Delivery, DeliveryStatus, HistoryStore, MetaStore, OutboxStore

__all__ = [
    "Interrupted",
    "ReplayChange",
    "ReplayReport",
    "ReplayStore",
    "replay_changes",
    "replay_handlers",
    "run_key",
]

log = logging.getLogger(__name__)


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
        by_task, _ = fold_entries(await store.history_of_tasks(ids, upto))
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
    run_id: str = ""  # this run's id, in every replayed change's idempotency key


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
    start, run_id = _resume_point(await checkpoint.load())
    report.resumed_from, report.run_id = start, run_id
    # Saved before the first delivery: a run killed during it resumes with the same id,
    # so the change it redelivers keeps its key.
    await checkpoint.save({"next": start, "run": run_id})
    live_seqs = await _live_seqs(store, changes)

    async def invoke(sub: Subscription, change: PhaseChange) -> None:
        if call is not None:
            await call(sub, change)
        else:
            await asyncio.wait_for(sub.fn(change), sub.timeout_s)

    for index in range(start, len(changes)):
        c = changes[index]
        seq = live_seqs.get((c.task_id, c.event_id, c.phase)) or _synthetic_seq(c)
        record = c.recorded(seq, 0)
        for sub in subscriptions:
            # Built per handler: the handler's name is part of the idempotency key.
            change = PhaseChange.from_record(record, handler=sub.name, replay_run=run_id)
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
        await checkpoint.save({"next": index + 1, "run": run_id})
        job.report(index + 1, len(changes))
        if job.batch_done() and index + 1 < len(changes):
            raise Interrupted(f"replay stopped after {index + 1} of {len(changes)} changes")
    await checkpoint.clear()
    return report


def _resume_point(saved: Any) -> tuple[int, str]:
    """(index of the next change, run id) from a checkpoint; a fresh run without one.
    A bare index is a checkpoint of a release before run ids: resumed, with a new id."""
    if isinstance(saved, dict):
        run = saved.get("run")
        return int(saved.get("next") or 0), run if isinstance(run, str) and run else _new_run()
    return (int(saved) if saved else 0), _new_run()


def _new_run() -> str:
    return uuid.uuid4().hex


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
