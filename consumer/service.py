"""The composition root: build the store, ingestor, dispatcher and HTTP app from
:class:`~consumer.settings.Settings`, start them in order, stop them in reverse.

Everything below this module receives plain objects; this is where configuration
becomes behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from consumer.dispatch import Dispatcher, Handler, NamedHandler
from consumer.http import EventSink, HttpConfig, build_app
from consumer.ingest import Ingestor
from consumer.kafka import KafkaForwarder, KafkaSource
from consumer.memory_store import MemoryStore
from consumer.secrets import redact_text
from consumer.settings import Settings
from consumer.sqlite_store import SQLiteStore, path_from_url
from consumer.store import Store

__all__ = ["Service", "load_handlers", "open_store", "serve"]

log = logging.getLogger(__name__)


def open_store(settings: Settings) -> Store:
    """The backend named by ``database_url`` (not opened yet)."""
    url = settings.database_url
    if url.startswith("memory://"):
        return MemoryStore()
    return SQLiteStore(path_from_url(url), synchronous=settings.sqlite_synchronous)


class HandlerLoadError(ValueError):
    pass


def load_handlers(refs: Sequence[str]) -> list[NamedHandler]:
    """Resolve ``module:attribute`` references to async callables.

    An attribute may be one handler or a list/tuple of them (a module exporting several).
    """
    loaded: list[NamedHandler] = []
    for ref in refs:
        module_name, sep, attr = ref.partition(":")
        if not sep or not module_name or not attr:
            raise HandlerLoadError(f"handler reference {ref!r} is not module:attribute")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise HandlerLoadError(
                f"cannot import {module_name!r} for handler {ref!r}: {exc}"
            ) from exc
        target = module
        for part in attr.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise HandlerLoadError(f"{module_name!r} has no attribute {attr!r}") from None
        items = list(target) if isinstance(target, list | tuple) else [target]
        for index, item in enumerate(items):
            if not callable(item):
                raise HandlerLoadError(f"handler {ref!r} is not callable")
            name = ref if len(items) == 1 else f"{ref}[{index}]"
            loaded.append(NamedHandler(name, _as_handler(item, ref)))
    return loaded


def _as_handler(item: object, ref: str) -> Handler:
    if not (
        inspect.iscoroutinefunction(item)
        or inspect.iscoroutinefunction(
            getattr(item, "__call__", None)  # noqa: B004 - async callable objects
        )
    ):
        raise HandlerLoadError(f"handler {ref!r} must be an async callable (async def)")
    return item  # type: ignore[return-value]


@dataclass
class Service:
    """A running phasewatch: store, ingestion, dispatch and the HTTP app."""

    settings: Settings
    store: Store
    handlers: list[NamedHandler] = field(default_factory=list)

    def __post_init__(self) -> None:
        settings = self.settings
        self.dispatcher = Dispatcher(
            self.store, self.handlers, timeout_s=settings.handler_timeout_s
        )
        self.ingestor = Ingestor(
            self.store,
            source="webhook",
            max_batch=settings.ingest_max_batch,
            on_changes=self.dispatcher.notify,
        )
        self.kafka: KafkaSource | None = None
        self.forwarder: KafkaForwarder | None = None
        sink: EventSink = self.ingestor
        if settings.kafka_bootstrap_servers:
            self.kafka = KafkaSource(self.store, settings, on_changes=self.dispatcher.notify)
            if settings.webhook_forward:
                self.forwarder = KafkaForwarder(settings)
                sink = self.forwarder
        secret = settings.webhook_secret
        token = settings.api_token
        self.app = build_app(
            self.store,
            sink,
            HttpConfig(
                webhook_secret=secret.get_secret_value().encode() if secret else None,
                tolerance_ms=settings.webhook_tolerance_s * 1000,
                max_body_bytes=settings.webhook_max_body_bytes,
                api_token=token.get_secret_value() if token else None,
            ),
            self.status,
        )
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    async def status(self) -> dict[str, Any]:
        """The readiness payload: store counts, ingestion, dispatch and Kafka figures."""
        stats = await self.store.stats()
        ingest = self.ingestor.stats
        status: dict[str, Any] = {
            "events": stats.events,
            "tasks": stats.tasks,
            "pendingChanges": stats.pending_changes,
            "ingest": {
                "accepted": ingest.accepted,
                "duplicates": ingest.duplicates,
                "batches": ingest.batches,
                "largestBatch": ingest.largest_batch,
                "failed": ingest.failed,
            },
            "dispatch": {
                "delivered": self.dispatcher.delivered,
                "failures": self.dispatcher.failures,
            },
        }
        if self.kafka is not None:
            status["kafka"] = self.kafka.status()
        if self.forwarder is not None:
            status["forwarded"] = self.forwarder.forwarded
        return status

    @classmethod
    def from_settings(cls, settings: Settings) -> Service:
        return cls(settings, open_store(settings), load_handlers(settings.handler_refs()))

    async def _on_startup(self, app: web.Application) -> None:
        del app
        await self.store.open()
        await self.ingestor.start()
        await self.dispatcher.start()
        if self.kafka is not None:
            await self.kafka.start()
        if self.forwarder is not None:
            await self.forwarder.start()
        if self.settings.webhook_secret is None:
            log.warning(
                "PHASEWATCH_WEBHOOK_SECRET is not set: UNSIGNED webhooks are accepted. "
                "Anyone who can reach this port can forge task events."
            )

    async def _on_cleanup(self, app: web.Application) -> None:
        del app
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self.kafka is not None:
            await self.kafka.stop()
        await self.ingestor.stop()
        await self.dispatcher.stop()
        await self.store.close()


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    service = Service.from_settings(settings)
    runner = web.AppRunner(service.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    log.info(
        "phasewatch listening on http://%s:%d (store %s, %d handler(s))",
        settings.http_host,
        settings.http_port,
        _safe_url(settings.database_url),
        len(service.handlers),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()


def _safe_url(url: str) -> str:
    return redact_text(url)
