"""Small builders for the stale-alert tests."""

from __future__ import annotations

from consumer.core.codec import decode
from consumer.store.base import IngestStore
from tests.support import snapshot, webhook_body

MINUTE = 60_000
FIVE_MIN = 300_000


async def put(
    store: IngestStore,
    task_id: str,
    phase: str,
    updated_at: int,
    *,
    source: str = "webhook",
    record_changes: bool = True,
    event_id: str | None = None,
) -> None:
    """One snapshot of ``task_id`` in ``phase`` at ``updated_at``, as ``source`` sends it."""
    body = webhook_body(event_id or f"{task_id}-{updated_at}", snapshot(task_id, phase, updated_at))
    await store.ingest([decode(body)], source, updated_at, record_changes=record_changes)
