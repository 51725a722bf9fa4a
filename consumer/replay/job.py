"""The one convention for long jobs (import, export, Kafka replay, rebuild, replay
handlers): how they report progress, how they are asked to stop, and where they keep
the point a re-run resumes from.

* **Progress**: ``job.report(done, total)`` after each batch; the CLI draws a bar.
* **Stop**: ``job.stop`` is an :class:`asyncio.Event` (the CLI sets it on Ctrl-C). A job
  checks :attr:`Job.stopping` between batches and ends after the batch in flight, with
  its checkpoint saved. ``on_batch`` is called after each batch with the batch count;
  raising ``KeyboardInterrupt`` from it stops the job exactly as Ctrl-C does (tests use
  this to stop at a precise point).
* **Checkpoint**: a :class:`Checkpoint` is a JSON note in the store's meta, saved after
  a commit (never ahead of what is committed), at most once per ``every_s`` and always
  when stopping, and deleted when the job is done. Redoing a batch is harmless (ingest
  is idempotent), so a hard kill costs only the re-reading since the last save.

Nothing here touches a terminal or the environment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from consumer.store.base import MetaStore

__all__ = ["BatchHook", "Checkpoint", "Interrupted", "Job", "Progress"]

Progress = Callable[[int, int | None], None]
"""``progress(done, total)``: units done so far in this run, and the total if known."""

BatchHook = Callable[[int], None]
"""Called after each batch with the number of batches so far in this run. Raising
``KeyboardInterrupt`` from it stops the job as Ctrl-C does."""


class Interrupted(Exception):
    """Stopped on request; a checkpoint was saved and a re-run continues from it."""


@dataclass
class Job:
    """A long job's controls. The default job reports nothing and runs to the end."""

    progress: Progress | None = None
    on_batch: BatchHook | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    batches: int = 0  # batches done in this run

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    def report(self, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def batch_done(self) -> bool:
        """Count a finished (committed) batch and run the hook; True when the job should
        stop now."""
        self.batches += 1
        if self.on_batch is not None:
            try:
                self.on_batch(self.batches)
            except KeyboardInterrupt:
                self.stop.set()
        return self.stopping


class Checkpoint:
    """A long job's resume point under ``key`` in the store's meta notes."""

    def __init__(self, meta: MetaStore, key: str, *, every_s: float = 1.0) -> None:
        self._meta = meta
        self.key = key
        self._every_s = every_s
        self._saved_at = time.monotonic()

    async def load(self) -> Any | None:
        """The saved point (JSON), or None when there is none: a fresh start."""
        note = await self._meta.get_meta(self.key)
        return None if note is None else orjson.loads(note)

    async def save(self, point: Any, *, force: bool = False) -> None:
        """Save ``point`` if ``every_s`` passed since the last save, or with ``force``
        (stopping). Call it only once what ``point`` covers is committed."""
        if not force and time.monotonic() - self._saved_at < self._every_s:
            return
        await self._meta.set_meta(self.key, orjson.dumps(point).decode())
        self._saved_at = time.monotonic()

    async def clear(self) -> None:
        """The job is done: a later run with the same key starts afresh."""
        await self._meta.set_meta(self.key, None)
