"""What the API's handlers find on the application: the store roles they read and
administer, and the readiness figures.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from consumer.store.base import HistoryStore, OutboxStore, ViewStore

__all__ = [
    "LAG_KEY",
    "LAG_LIMIT_KEY",
    "MAX_PAGE",
    "STATUS_KEY",
    "STORE_KEY",
    "ApiStore",
    "StatusFn",
]

MAX_PAGE = 1000  # most items one request lists


class ApiStore(ViewStore, HistoryStore, OutboxStore, Protocol):
    """The roles the API uses: the view and history to read, the outbox to administer
    dead letters."""


StatusFn = Callable[[], Awaitable[dict[str, Any]]]

STORE_KEY = web.AppKey("store", ApiStore)
STATUS_KEY: web.AppKey[StatusFn] = web.AppKey("status")
LAG_KEY: web.AppKey[Callable[[], float]] = web.AppKey("loop_lag")  # seconds, this loop's
LAG_LIMIT_KEY = web.AppKey("loop_lag_limit", float)  # /healthz fails past it
