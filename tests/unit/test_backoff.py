"""The one backoff rule: full jitter under an exponential, capped ceiling."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core.backoff import Backoff, Retries


@given(st.integers(1, 10_000))
def test_a_delay_stays_under_its_capped_exponential_ceiling(failures: int) -> None:
    backoff = Backoff(0.1, 5.0)
    ceiling = min(5.0, 0.1 * 2 ** min(failures - 1, 60))
    assert backoff.ceiling(failures) == pytest.approx(ceiling)
    assert 0 <= backoff.delay(failures) <= ceiling


def test_the_ceiling_doubles_until_the_cap() -> None:
    backoff = Backoff(0.5, 4.0)
    assert [backoff.ceiling(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_retries_start_over_after_a_success() -> None:
    retries = Retries(Backoff(1.0, 100.0))
    for _ in range(5):
        retries.failed()
    assert retries.failures == 5 and retries.backoff.ceiling(retries.failures) == 16.0
    retries.succeeded()
    assert retries.failures == 0
    assert retries.failed() <= 1.0  # the first failure again


def test_a_backoff_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        Backoff(2.0, 1.0)
