"""In-memory :class:`~consumer.store.Store`: the fake for fast tests and demos.

Same semantics as the durable backends (it runs the same :func:`plan_batch`), none of the
durability. Nothing survives the process.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from consumer.core.change import ChangeRecord, stale_kind
from consumer.core.codec import Event, decode
from consumer.core.fold import TaskState
from consumer.core.plan import DedupKey, dedup_key, plan_batch
from consumer.core.receipt import Receipt
from consumer.store.base import (
    REPLAYED_SOURCES,
    Cursor,
    Delivery,
    DeliveryStatus,
    HistoryEntry,
    IngestResult,
    RawIngestResult,
    StoredTask,
    StoreStats,
    TaskPage,
    TaskQuery,
    ingest_decoded,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, *, record_updates: bool = False) -> None:
        self.record_updates = record_updates
        self._events: dict[DedupKey, HistoryEntry] = {}
        self._by_task: dict[str, list[HistoryEntry]] = {}
        self._states: dict[str, TaskState] = {}
        self._versions: dict[str, int] = {}
        self._changes: dict[int, ChangeRecord] = {}  # by seq (pruning leaves holes)
        self._last_change = 0
        self._deliveries: dict[tuple[str, int, bool], Delivery] = {}
        self._cursors: dict[str, int] = {}
        self._seq = 0
        self._leases: dict[str, tuple[str, int]] = {}
        self._meta: dict[str, str] = {}
        self._staged: dict[str, TaskState] = {}
        self._pruned_upto = 0
        # Per task, the status.updatedAt values its live (not replayed) events carried.
        self._live_at: dict[str, set[int | float]] = {}
        # (task id, phase, stale_for_ms) -> the updatedAt last alerted.
        self._stale: dict[tuple[str, str, int], int | float] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def pipeline_depth(self) -> int:
        return 1  # writes are done when the call returns

    async def ingest(
        self,
        events: Sequence[Event],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
    ) -> IngestResult:
        touched = {e.task_id for e in events if e.task_id is not None}
        known = [k for k in map(dedup_key, events) if k in self._events]
        plan = plan_batch(
            events,
            known,
            {t: self._states[t] for t in touched if t in self._states},
            record_updates=self.record_updates,
            record_changes=record_changes,
        )
        for event in plan.new_events:
            self._seq += 1
            entry = HistoryEntry(
                self._seq,
                event.id,
                event.kind,
                event.format,
                source,
                received_at,
                event.created_at,
                event.task_id,
                event.raw,
                _kept(event.receipt),
            )
            self._events[dedup_key(event)] = entry
            if event.task_id is not None:
                self._by_task.setdefault(event.task_id, []).append(entry)
                if source not in REPLAYED_SOURCES and event.updated_at is not None:
                    self._live_at.setdefault(event.task_id, set()).add(event.updated_at)
        self._states.update(plan.states)
        for task_id in plan.states:
            self._versions.setdefault(task_id, 0)
        for task_id in plan.versions_bumped:
            self._versions[task_id] += 1
        recorded = []
        for change in plan.changes:
            self._last_change += 1
            record = change.recorded(self._last_change, received_at)
            self._changes[self._last_change] = record
            recorded.append(record)
        return IngestResult(plan.outcomes, recorded)

    async def ingest_raw(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
        keys: Sequence[bytes | None] | None = None,  # one writer, on this loop: unused
        receipts: Sequence[Receipt | None] | None = None,
    ) -> RawIngestResult:
        del keys
        return await ingest_decoded(
            self, raws, source, received_at, record_changes=record_changes, receipts=receipts
        )

    async def get_task(self, task_id: str) -> StoredTask | None:
        state = self._states.get(task_id)
        return None if state is None else StoredTask(state.task, self._versions[task_id])

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        rows = sorted(
            (s for s in self._states.values() if _matches(s, query)),
            key=lambda s: (s.updated_at, s.task_id),
            reverse=query.descending,
        )
        if query.after is not None:
            pos = (query.after.updated_at, query.after.task_id)
            keys = [(s.updated_at, s.task_id) for s in rows]
            if query.descending:
                rows = [s for s, k in zip(rows, keys, strict=True) if k < pos]
            else:
                rows = rows[bisect.bisect_right(keys, pos) :]
        page = rows[: query.limit]
        more = len(rows) > query.limit
        tasks = [StoredTask(s.task, self._versions[s.task_id]) for s in page]
        cursor = Cursor(page[-1].updated_at, page[-1].task_id) if more and page else None
        return TaskPage(tasks, cursor)

    async def task_history(self, task_id: str) -> list[HistoryEntry]:
        return list(self._by_task.get(task_id, []))

    async def history_after(
        self, seq: int, limit: int = 1000, *, task_id: str | None = None
    ) -> list[HistoryEntry]:
        source = self._by_task.get(task_id, []) if task_id is not None else self._events.values()
        return sorted((e for e in source if e.seq > seq), key=lambda e: e.seq)[:limit]

    async def task_ids_after(self, after: str | None, limit: int = 500) -> list[str]:
        return sorted(t for t in self._by_task if after is None or t > after)[:limit]

    async def history_of_tasks(self, task_ids: Sequence[str], upto_seq: int) -> list[HistoryEntry]:
        return [e for t in sorted(task_ids) for e in self._by_task.get(t, []) if e.seq <= upto_seq]

    async def stage_rebuilt(self, states: Mapping[str, TaskState]) -> None:
        self._staged.update(states)

    async def swap_rebuilt(self, upto_seq: int) -> int:
        late = [decode(e.raw) for e in self._events.values() if e.seq > upto_seq and e.task_id]
        touched = {e.task_id for e in late if e.task_id is not None}
        plan = plan_batch(late, (), {t: self._staged[t] for t in touched if t in self._staged})
        self._staged.update(plan.states)
        for task_id, state in self._staged.items():
            old = self._states.get(task_id)
            version = self._versions.get(task_id, 0)
            self._versions[task_id] = version + (old is None or old.task != state.task)
        self._states = dict(self._staged)
        self._staged = {}
        return len(self._states)

    async def discard_rebuilt(self) -> None:
        self._staged = {}

    async def get_meta(self, key: str) -> str | None:
        return self._meta.get(key)

    async def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._meta.pop(key, None)
        else:
            self._meta[key] = value

    async def task_changes(self, task_id: str) -> list[ChangeRecord]:
        return [c for c in self._changes.values() if c.task_id == task_id]

    async def changes_after(self, seq: int, limit: int = 500) -> list[ChangeRecord]:
        found = (self._changes.get(s) for s in range(seq + 1, self._last_change + 1))
        out: list[ChangeRecord] = []
        for change in found:
            if change is not None:
                out.append(change)
                if len(out) == limit:
                    break
        return out

    async def changes_by_seq(self, seqs: Sequence[int]) -> list[ChangeRecord]:
        return [self._changes[s] for s in sorted(set(seqs)) if s in self._changes]

    async def oldest_change_seq(self) -> int:
        return self._pruned_upto + 1

    async def prune_changes(
        self,
        *,
        before_ms: int | None = None,
        keep_last: int | None = None,
        needed_by: Sequence[str] | None = None,
    ) -> int:
        floor = _needed_floor(self._cursors, needed_by, self._last_change)
        pending = {
            d.seq
            for d in self._deliveries.values()
            if d.status in (DeliveryStatus.FAILING, DeliveryStatus.DEAD, DeliveryStatus.REDRIVE)
        }
        newest_kept = self._last_change - keep_last if keep_last is not None else None
        gone = [
            seq
            for seq, c in self._changes.items()
            if seq <= floor
            and seq not in pending
            and (before_ms is None or c.recorded_at < before_ms)
            and (newest_kept is None or seq <= newest_kept)
            and (before_ms is not None or keep_last is not None)
        ]
        for seq in gone:
            del self._changes[seq]
        self._pruned_upto = max([self._pruned_upto, *gone])
        return len(gone)

    async def get_cursor(self, handler: str) -> int | None:
        return self._cursors.get(handler)

    async def set_cursor(self, handler: str, seq: int) -> None:
        self._cursors[handler] = seq

    async def set_cursors(self, cursors: Mapping[str, int]) -> None:
        self._cursors.update(cursors)

    async def record_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self._deliveries[(d.handler, d.seq, d.replay)] = d

    async def deliveries_for(
        self, handler: str, seqs: Sequence[int], *, replay: bool = False
    ) -> dict[int, Delivery]:
        found = (self._deliveries.get((handler, s, replay)) for s in seqs)
        return {d.seq: d for d in found if d is not None}

    async def list_deliveries(
        self, statuses: Sequence[DeliveryStatus], handler: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        rows = sorted(
            (
                d
                for d in self._deliveries.values()
                if d.status in statuses and (handler is None or d.handler == handler)
            ),
            key=lambda d: (d.seq, d.handler),
        )
        return rows[:limit]

    async def set_delivery_status(
        self,
        frm: DeliveryStatus,
        to: DeliveryStatus,
        *,
        handler: str | None = None,
        seqs: Sequence[int] | None = None,
    ) -> int:
        wanted = None if seqs is None else set(seqs)
        moved = 0
        for key, d in list(self._deliveries.items()):
            if d.status != frm or (handler is not None and d.handler != handler):
                continue
            if wanted is not None and d.seq not in wanted:
                continue
            self._deliveries[key] = replace(d, status=to)
            moved += 1
        return moved

    async def acquire_lease(
        self, name: str, owner: str, ttl_ms: int, now_ms: int, *, take_from: str | None = None
    ) -> str:
        held = self._leases.get(name)
        if held is None or held[0] in (owner, take_from) or held[1] < now_ms:
            self._leases[name] = (owner, now_ms + ttl_ms)
        return self._leases[name][0]

    async def acquire_leases(
        self, names: Sequence[str], owner: str, ttl_ms: int, now_ms: int
    ) -> list[str]:
        return [await self.acquire_lease(name, owner, ttl_ms, now_ms) for name in names]

    async def release_lease(self, name: str, owner: str) -> None:
        if self._leases.get(name, ("", 0))[0] == owner:
            del self._leases[name]

    async def listen_changes(self, wake: Callable[[], None]) -> None:
        del wake  # one process writes here: its commits wake the dispatcher directly

    async def lease_holders(self, prefix: str, now_ms: int) -> dict[str, str]:
        return {
            name: owner
            for name, (owner, expires_at) in self._leases.items()
            if name.startswith(prefix) and expires_at >= now_ms
        }

    async def record_stale(
        self, phase: str, stale_for_ms: int, now_ms: int, limit: int = 500
    ) -> list[ChangeRecord]:
        kind = stale_kind(stale_for_ms)
        cutoff = now_ms - stale_for_ms
        last_phase: dict[str, str] = {}
        for seq in sorted(self._changes):
            change = self._changes[seq]
            if change.kind == "phase":
                last_phase[change.task_id] = change.phase
        due = sorted(
            (
                s
                for s in self._states.values()
                if s.phase == phase
                and s.updated_at <= cutoff
                and self._stale.get((s.task_id, phase, stale_for_ms)) != s.updated_at
                and (
                    last_phase.get(s.task_id) == phase
                    or s.updated_at in self._live_at.get(s.task_id, ())
                )
            ),
            key=lambda s: (s.updated_at, s.task_id),
        )[:limit]
        recorded = []
        for state in due:
            self._last_change += 1
            record = ChangeRecord(
                self._last_change,
                state.task_id,
                state.status_key[2],
                phase,
                phase,
                state.updated_at,
                now_ms,
                dict(state.task),
                kind,
            )
            self._changes[self._last_change] = record
            self._stale[(state.task_id, phase, stale_for_ms)] = state.updated_at
            recorded.append(record)
        return recorded

    async def count_stale(self, phase: str, stale_for_ms: int, now_ms: int) -> int:
        cutoff = now_ms - stale_for_ms
        return sum(1 for s in self._states.values() if s.phase == phase and s.updated_at <= cutoff)

    async def stats(self) -> StoreStats:
        return StoreStats(
            len(self._events), len(self._states), len(self._changes), self._last_change, self._seq
        )


def _kept(receipt: Receipt | None) -> Receipt | None:
    """The receipt as a durable backend reads it back (an empty one is not kept)."""
    return None if receipt is None else Receipt.decode(receipt.encode())


def _needed_floor(cursors: Mapping[str, int], needed_by: Sequence[str] | None, last: int) -> int:
    """The highest seq every named handler has resolved (``last`` when none is named)."""
    seqs = [
        seq
        for name, seq in cursors.items()
        if needed_by is None or any(name == h or name.startswith(f"{h}@") for h in needed_by)
    ]
    return min(seqs, default=last)


def _matches(state: TaskState, query: TaskQuery) -> bool:
    if query.phases and state.phase not in query.phases:
        return False
    if query.types and state.task.get("type") not in query.types:
        return False
    return query.updated_since is None or state.updated_at >= query.updated_since
