"""In-process HTTP tier: the whole app (store, ingestor, dispatcher) behind aiohttp's
test client, configured like ``phasewatch serve`` would be."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from consumer.dispatch.loading import load_subscriptions
from consumer.dispatch.subscription import Subscription
from consumer.service import Service
from consumer.settings import Settings
from consumer.store.base import Store
from consumer.store.sqlite.store import SQLiteStore
from tests.support import FIXTURE_SECRET

PATH = "/webhooks/livepeer"
MakeClient = Callable[..., Awaitable[tuple[TestClient[Any, Any], Service]]]


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Any) -> MakeClient:
    async def make(
        *, store: Store | None = None, handlers: list[Subscription] | None = None, **env: Any
    ) -> tuple[TestClient[Any, Any], Service]:
        config = {"webhook_secret": FIXTURE_SECRET.decode(), "webhook_tolerance_s": 0, **env}
        settings = Settings(**config)
        if handlers is None:  # as `serve` would: PHASEWATCH_HANDLERS and the built-ins
            handlers = load_subscriptions(settings.handler_refs(), settings)
        service = Service(settings, store or SQLiteStore(tmp_path / "pw.db"), handlers)
        client = await aiohttp_client(service.app)
        return client, service

    return make
