"""How long to wait before the next try: exponential backoff with full jitter, the one
rule behind every retry loop (the Kafka source waiting for the store or the brokers,
delivery records, handler retries). Pure: it computes delays; callers sleep.

Full jitter (a uniform draw below an exponentially growing ceiling) spreads the retries
of many failing callers, so that they do not come back in step (AWS Architecture Blog,
"Exponential Backoff And Jitter").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff", "Retries"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delay(n)``: the wait after the ``n``-th failure in a row (n >= 1), uniform in
    ``[0, min(max_s, initial_s * 2 ** (n - 1))]``."""

    initial_s: float = 0.1
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < self.initial_s:
            raise ValueError(f"need 0 <= initial_s <= max_s, got {self.initial_s}, {self.max_s}")

    def ceiling(self, failures: int) -> float:
        # min() first: 2 ** n overflows a float for large n.
        exponent = min(max(failures - 1, 0), 60)
        return float(min(self.max_s, self.initial_s * 2**exponent))

    def delay(self, failures: int) -> float:
        return random.uniform(0, self.ceiling(failures))  # noqa: S311 - jitter, not a secret


@dataclass(slots=True)
class Retries:
    """A retry loop's state: failures in a row under one :class:`Backoff`.
    ``failed()`` counts one and returns the wait; ``succeeded()`` starts over."""

    backoff: Backoff = field(default_factory=Backoff)
    failures: int = 0

    def failed(self) -> float:
        self.failures += 1
        return self.backoff.delay(self.failures)

    def succeeded(self) -> None:
        self.failures = 0
