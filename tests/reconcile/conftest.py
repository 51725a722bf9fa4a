"""Fixtures of the reconcile tests: a running Studio stand-in, and clients of it that
record the waits they are asked for instead of sitting them out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from consumer.core.backoff import Backoff
from consumer.sources.studio import StudioClient
from tests.reconcile.studio_standin import StudioStandin, running

MakeClient = Callable[..., StudioClient]


@pytest.fixture
async def studio() -> AsyncIterator[StudioStandin]:
    """Studio with a page cap of 7, so that a few tasks make several pages."""
    async with running(StudioStandin(max_limit=7)) as standin:
        yield standin


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
async def make_client(studio: StudioStandin, waits: list[float]) -> AsyncIterator[MakeClient]:
    made: list[StudioClient] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    def make(**kw: Any) -> StudioClient:
        options: dict[str, Any] = {"backoff": Backoff(0.5, 4.0), "sleep": sleep, **kw}
        key = options.pop("api_key", studio.api_key)
        client = StudioClient(studio.url, key, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()
