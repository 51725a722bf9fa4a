"""The handler seam as the dispatcher sees it: how a handler says what it wants
(:class:`Subscription`) and how it says a failure is final (:class:`PermanentError`).
Pure: no I/O.

The ergonomic API (``@handlers.on(phase="completed")``) lives in the ``handlers`` package
and builds these objects; the dispatcher only ever sees these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from consumer.core.change import PhaseChange

__all__ = ["Handler", "PermanentError", "Subscription", "subscription_of"]


Handler = Callable[[PhaseChange], Awaitable[None]]


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help (a 4xx from a webhook receiver, a
    malformed target): the delivery goes to dead letters at once."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """A handler and what it wants. Empty filters match everything.

    ``phases``: target phases; ``previous``: phases changed from (``None`` = first sight);
    ``types``: task types; ``where``: a predicate on the change. ``updates``: also receive
    every materialized update, not only phase changes. Delivery policy: at most
    ``concurrency`` calls at once (always one at a time per task), each limited to
    ``timeout_s``; failures retried with exponential backoff and jitter from
    ``backoff_s`` up to ``max_backoff_s``, at most ``max_attempts`` times and for at most
    ``max_age_s`` after the first attempt, then dead-lettered.
    """

    name: str
    fn: Handler
    phases: frozenset[str] = frozenset()
    previous: frozenset[str | None] = frozenset()
    types: frozenset[str] = frozenset()
    where: Callable[[PhaseChange], bool] | None = None
    updates: bool = False
    concurrency: int = 8
    timeout_s: float = 30.0
    max_attempts: int = 8
    backoff_s: float = 0.5
    max_backoff_s: float = 300.0
    max_age_s: float = 24 * 3600.0
    # Lifecycle of resources the handler holds (an HTTP session, a producer).
    on_start: Callable[[], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def wants(self, kind: str, task_type: str | None, previous: str | None, phase: str) -> bool:
        """The cheap filters, checked before a PhaseChange is even built."""
        if kind == "update" and not self.updates:
            return False
        if self.phases and phase not in self.phases:
            return False
        if kind == "phase" and self.previous and previous not in self.previous:
            return False
        return not (self.types and task_type not in self.types)

    def matches(self, change: PhaseChange) -> bool:
        task_type = change.task.type if isinstance(change.task.type, str) else None
        if not self.wants(change.kind, task_type, change.previous_phase, change.phase):
            return False
        return self.where is None or bool(self.where(change))


def subscription_of(obj: Any, name: str) -> Subscription:
    """A Subscription as configured, or a bare async callable wrapped in one (no filters)."""
    if isinstance(obj, Subscription):
        return obj
    if callable(obj):
        return Subscription(name=name, fn=obj)
    raise TypeError(f"{name}: not a handler (an async callable or a Subscription)")
