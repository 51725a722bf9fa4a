"""The handler seam as the dispatcher sees it: how a handler says what it wants
(:class:`Subscription`) and how it says a failure is final (:class:`PermanentError`).
Pure: no I/O.

The ergonomic API (``@handlers.on(phase="completed")``) lives in the ``handlers`` package
and builds these objects; the dispatcher only ever sees these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Unpack

from consumer.core.change import PhaseChange, stale_threshold_ms
from consumer.dispatch.policy import DeliveryPolicy, PolicyOverrides

__all__ = [
    "DeliveryPolicy",
    "Handler",
    "PermanentError",
    "Subscription",
    "stale_ms",
    "subscription_of",
]


Handler = Callable[[PhaseChange], Awaitable[None]]

DEFAULT_POLICY = DeliveryPolicy()


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help (a 4xx from a webhook receiver, a
    malformed target): the delivery goes to dead letters at once."""


@dataclass(frozen=True, slots=True, init=False)
class Subscription:
    """A handler and what it wants. Empty filters match everything.

    ``phases``: target phases; ``previous``: phases changed from (``None`` = first sight);
    ``types``: task types; ``where``: a predicate on the change. ``updates``: also receive
    every materialized update, not only phase changes. ``policy``: how it is delivered
    (:class:`~consumer.dispatch.policy.DeliveryPolicy`); its fields may also be given
    one by one (``Subscription(name=..., fn=..., max_attempts=3)``) and read as
    attributes (``sub.max_attempts``). ``on_start``/``on_stop``: the lifecycle of
    resources the handler holds (an HTTP session, a producer).

    ``stale_for``: phase -> seconds. The handler also receives a ``kind="stale"`` alert,
    once, when a task stays in one of those phases with no newer snapshot for that long
    after its ``status.updatedAt`` (``types`` and ``where`` apply to alerts too;
    ``phases``, ``previous`` and ``updates`` do not). ``stale_only``: receive only those
    alerts, no phase changes or updates (what ``@on(phase=..., stale_for=...)`` builds).

    Calling a subscription calls its handler, so a function decorated with ``@on`` can
    still be awaited directly (``await publish(change)``), e.g. in the user's own tests:
    filters and the delivery policy are the dispatcher's business, not the call's.
    """

    name: str
    fn: Handler
    phases: frozenset[str]
    previous: frozenset[str | None]
    types: frozenset[str]
    where: Callable[[PhaseChange], bool] | None
    updates: bool
    policy: DeliveryPolicy
    on_start: Callable[[], Awaitable[None]] | None
    on_stop: Callable[[], Awaitable[None]] | None
    extra: dict[str, Any]
    stale_for: dict[str, float]
    stale_only: bool

    def __init__(
        self,
        name: str,
        fn: Handler,
        *,
        phases: frozenset[str] = frozenset(),
        previous: frozenset[str | None] = frozenset(),
        types: frozenset[str] = frozenset(),
        where: Callable[[PhaseChange], bool] | None = None,
        updates: bool = False,
        policy: DeliveryPolicy = DEFAULT_POLICY,
        on_start: Callable[[], Awaitable[None]] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        extra: dict[str, Any] | None = None,
        stale_for: Mapping[str, float] | None = None,
        stale_only: bool = False,
        **policy_fields: Unpack[PolicyOverrides],
    ) -> None:
        # Written out (init=False) so that the policy's fields stay accepted one by one.
        values: dict[str, Any] = {
            "name": name,
            "fn": fn,
            "phases": phases,
            "previous": previous,
            "types": types,
            "where": where,
            "updates": updates,
            "policy": policy.with_(**policy_fields) if policy_fields else policy,
            "on_start": on_start,
            "on_stop": on_stop,
            "extra": {} if extra is None else extra,
            "stale_for": dict(stale_for or {}),
            "stale_only": stale_only,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    async def __call__(self, change: PhaseChange) -> None:
        """Call the handler once, as the dispatcher's first attempt would."""
        await self.fn(change)

    @property
    def concurrency(self) -> int:
        return self.policy.concurrency

    @property
    def timeout_s(self) -> float:
        return self.policy.timeout_s

    @property
    def max_attempts(self) -> int:
        return self.policy.max_attempts

    @property
    def backoff_s(self) -> float:
        return self.policy.backoff_s

    @property
    def max_backoff_s(self) -> float:
        return self.policy.max_backoff_s

    @property
    def max_age_s(self) -> float:
        return self.policy.max_age_s

    def stale_watches(self) -> set[tuple[str, int]]:
        """The ``(phase, stale_for_ms)`` pairs this subscription wants alerts for."""
        return {(phase, stale_ms(seconds)) for phase, seconds in self.stale_for.items()}

    def wants(self, kind: str, task_type: str | None, previous: str | None, phase: str) -> bool:
        """The cheap filters, checked before a PhaseChange is even built. ``kind`` is the
        outbox's (a stale alert's carries its threshold, see
        :func:`~consumer.core.change.stale_kind`) or a PhaseChange's."""
        if kind.startswith("stale"):
            seconds = self.stale_for.get(phase)
            if seconds is None:
                return False
            threshold = stale_threshold_ms(kind)
            if threshold is not None and threshold != stale_ms(seconds):
                return False  # the alert of another wait for this phase
            return not (self.types and task_type not in self.types)
        if self.stale_only:
            return False
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


def stale_ms(seconds: float) -> int:
    """A ``stale_for`` in seconds as the store's threshold: whole milliseconds."""
    return max(round(seconds * 1000), 1)


def subscription_of(obj: Any, name: str) -> Subscription:
    """A Subscription as configured, or a bare async callable wrapped in one (no filters)."""
    if isinstance(obj, Subscription):
        return obj
    if callable(obj):
        return Subscription(name=name, fn=obj)
    raise TypeError(f"{name}: not a handler (an async callable or a Subscription)")
