"""How one handler is delivered to: the delivery policy as one frozen value. Pure: no I/O.

``DeliveryPolicy()`` is the single place the defaults are spelled; ``@on``, the built-ins,
bare callables loaded from ``PHASEWATCH_HANDLERS`` (through the settings, which build one
policy at the edge) and the dispatcher all start from it. A policy is checked when it is
built, so a handler module with an impossible policy fails at import, not at delivery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TypedDict, Unpack

from consumer.core.backoff import Backoff

__all__ = ["DeliveryPolicy", "PolicyOverrides"]


class PolicyOverrides(TypedDict, total=False):
    """The fields of a :class:`DeliveryPolicy`, for ``**kwargs`` that override some."""

    concurrency: int
    timeout_s: float
    max_attempts: int
    backoff_s: float
    max_backoff_s: float
    max_age_s: float


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """At most ``concurrency`` calls of the handler at once (always one at a time per
    task), each cancelled after ``timeout_s``; a failure is retried with exponential
    backoff and full jitter from ``backoff_s`` up to ``max_backoff_s``, at most
    ``max_attempts`` times and for at most ``max_age_s`` after the first attempt, then
    dead-lettered.

    Raises TypeError or ValueError, naming the field, for a value that cannot work.
    Seconds are kept as floats whatever number was given.
    """

    concurrency: int = 8
    timeout_s: float = 30.0
    max_attempts: int = 8
    backoff_s: float = 0.5
    max_backoff_s: float = 300.0
    max_age_s: float = 86400.0

    def __post_init__(self) -> None:
        for label in ("concurrency", "max_attempts"):
            count = getattr(self, label)
            if isinstance(count, bool) or not isinstance(count, int):
                raise TypeError(f"{label} must be an int, got {count!r}")
            if count < 1:
                raise ValueError(f"{label} must be at least 1, got {count}")
        for label in ("timeout_s", "max_age_s"):
            seconds = getattr(self, label)
            if not _is_seconds(seconds) or seconds <= 0:
                raise ValueError(f"{label} must be a positive number of seconds, got {seconds!r}")
        for label in ("backoff_s", "max_backoff_s"):
            seconds = getattr(self, label)
            if not _is_seconds(seconds) or seconds < 0:
                raise ValueError(f"{label} must be a number of seconds >= 0, got {seconds!r}")
        for label in ("timeout_s", "max_age_s", "backoff_s", "max_backoff_s"):
            # Frozen: object.__setattr__ is the dataclass way to normalize at construction.
            object.__setattr__(self, label, float(getattr(self, label)))
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s}) is below backoff_s ({self.backoff_s})"
            )

    def with_(self, **overrides: Unpack[PolicyOverrides]) -> DeliveryPolicy:
        """This policy with some fields replaced (checked again)."""
        return replace(self, **overrides)

    def gives_up(self, attempts: int, age_s: float) -> bool:
        """Whether a delivery that has failed ``attempts`` times, the first ``age_s``
        seconds ago, is dead rather than retried."""
        return attempts >= self.max_attempts or age_s >= self.max_age_s

    @property
    def backoff(self) -> Backoff:
        """The wait after each failed attempt: full jitter below a ceiling doubling from
        ``backoff_s`` up to ``max_backoff_s`` (the rule every retry loop here follows)."""
        return Backoff(initial_s=self.backoff_s, max_s=self.max_backoff_s)


def _is_seconds(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
