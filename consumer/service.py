"""The composition root: build the store, ingestor, dispatcher and HTTP app from
:class:`~consumer.settings.Settings`, start them in order, stop them in reverse.

Everything below this module receives plain objects; this is where configuration
becomes behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from consumer import tracing
from consumer.api.app import HttpConfig, build_app
from consumer.api.changes import ChangeFeed, StreamConfig
from consumer.changes_retention import RetentionLoop
from consumer.core.change import ChangeRecord
from consumer.core.secrets import describe_error, redact_text
from consumer.dispatch.dispatcher import Dispatcher
from consumer.dispatch.loading import load_subscriptions
from consumer.dispatch.subscription import Subscription
from consumer.lag import LoopLag
from consumer.logs import ACCESS_LOGGER, AccessLogger
from consumer.settings import ConfigError, Settings
from consumer.sources.group_commit import Ingestor
from consumer.sources.kafka.group import KafkaSource
from consumer.sources.kafka.options import BrokersUnreachable
from consumer.sources.kafka.producers import KafkaForwarder
from consumer.sources.reconcile import ReconcileLoop
from consumer.sources.studio import StudioClient
from consumer.sources.webhook import EventSink
from consumer.stale import StaleSweeper, watches_of
from consumer.store.base import Store
from consumer.store.memory import MemoryStore
from consumer.store.postgres.store import PostgresStore
from consumer.store.sqlite.process import SQLiteProcessStore
from consumer.store.sqlite.store import SQLiteStore, path_from_url

__all__ = ["Service", "open_store", "serve"]

log = logging.getLogger(__name__)


def open_store(settings: Settings, *, record_updates: bool = False, serving: bool = False) -> Store:
    """The backend named by ``database_url`` (not opened yet). ``record_updates``: also
    record non-phase changes in the outbox (some handler asked for updates). The SQLite
    writer process is for the long-running service (``serving``); a CLI command keeps
    its writes on a thread rather than start a process for a few statements."""
    url = settings.database_url
    if url.startswith("memory://"):
        return MemoryStore(record_updates=record_updates)
    if url.startswith(("postgresql://", "postgres://")):
        password = settings.database_password
        return PostgresStore(
            url,
            password=password.get_secret_value() if password else None,
            pool_size=settings.database_pool_size,
            record_updates=record_updates,
            migrate=settings.database_migrate,
        )
    path = path_from_url(url)
    if serving and settings.sqlite_writer == "process":
        return SQLiteProcessStore(
            path,
            synchronous=settings.sqlite_synchronous,
            record_updates=record_updates,
            fold_here=settings.sqlite_fold_here,
            migrate=settings.database_migrate,
        )
    return SQLiteStore(
        path,
        synchronous=settings.sqlite_synchronous,
        record_updates=record_updates,
        migrate=settings.database_migrate,
    )


@dataclass
class Service:
    """A running phasewatch: store, ingestion, dispatch and the HTTP app."""

    settings: Settings
    store: Store
    handlers: list[Subscription] = field(default_factory=list)

    def __post_init__(self) -> None:
        settings = self.settings
        self.dispatcher = Dispatcher(
            self.store,
            self.handlers,
            lanes=settings.dispatch_lanes,
            lease_s=settings.dispatch_lease_s,
        )
        self.ingestor = Ingestor(
            self.store,
            source="webhook",
            max_batch=settings.ingest_max_batch,
            max_inflight=self.store.pipeline_depth,
            on_changes=self._changes_committed,
        )
        # The changes feed's "changes committed" broadcaster: its readers re-read the store.
        self.feed = ChangeFeed(
            StreamConfig(
                heartbeat_s=settings.changes_heartbeat_s,
                max_buffer_bytes=settings.changes_stream_max_buffer_bytes,
                drain_timeout_s=settings.changes_stream_drain_timeout_s,
                linger_s=settings.changes_linger_s,
            )
        )
        self.retention = RetentionLoop(
            self.store,
            settings.changes_retention_policy(),
            needed_by=[s.name for s in self.handlers],
            interval_s=settings.changes_retention_interval_s,
        )
        # Stale alerts for the subscriptions that asked (stale_for), under the stale lease.
        self.stale = StaleSweeper(
            self.store,
            watches_of(self.handlers),
            lease_s=settings.dispatch_lease_s,
            on_changes=self._changes_committed,
        )
        self.kafka: KafkaSource | None = None
        self.forwarder: KafkaForwarder | None = None
        sink: EventSink = self.ingestor
        if settings.kafka_bootstrap_servers:
            self.kafka = KafkaSource(
                self.store,
                settings.kafka_connection(),
                settings.kafka_source(),
                on_changes=self._changes_committed,
            )
            if settings.webhook_forward:
                self.forwarder = KafkaForwarder(settings.kafka_connection(), settings.topics()[0])
                sink = self.forwarder
        self.reconcile = _reconcile_loop(settings, self.store, self._changes_committed)
        secret = settings.webhook_secret
        token = settings.api_token
        self.loop_lag = LoopLag()  # of the loop serving webhooks and the API
        self.app = build_app(
            self.store,
            sink,
            HttpConfig(
                webhook_secret=secret.get_secret_value().encode() if secret else None,
                tolerance_ms=settings.webhook_tolerance_s * 1000,
                max_body_bytes=settings.webhook_max_body_bytes,
                api_token=token.get_secret_value() if token else None,
                liveness_max_lag_s=settings.liveness_max_lag_s,
            ),
            self.status,
            lambda: self.loop_lag.seconds,
            feed=self.feed,
        )
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    def _changes_committed(self, changes: Sequence[ChangeRecord]) -> None:
        """After a commit here that recorded changes: dispatch and the feed wake."""
        self.dispatcher.notify(changes)
        self.feed.notify(changes)

    async def status(self) -> dict[str, Any]:
        """The readiness payload: store counts, ingestion, dispatch and Kafka figures."""
        stats = await self.store.stats()
        ingest = self.ingestor.stats
        status: dict[str, Any] = {
            "events": stats.events,
            "tasks": stats.tasks,
            "changes": stats.changes,
            "pendingChanges": self.dispatcher.pending(stats.last_change_seq),
            "store": dict(stats.backend),
            "ingest": {
                "accepted": ingest.accepted,
                "duplicates": ingest.duplicates,
                "rejected": ingest.rejected,
                "batches": ingest.batches,
                "largestBatch": ingest.largest_batch,
                "failed": ingest.failed,
            },
            "dispatch": self.dispatcher.status(),
            "loopLagSeconds": round(self.loop_lag.seconds, 4),
        }
        if self.kafka is not None:
            status["kafka"] = self.kafka.status()
        failing = await self._store_failing() or status.get("kafka", {}).get("storeFailing")
        if failing is not None:
            status["storeFailing"] = failing
        if self.forwarder is not None:
            status["forwarded"] = self.forwarder.forwarded
        if self.reconcile is not None:
            status["reconcile"] = self.reconcile.status()
        if self.stale.watches:
            status["stale"] = self.stale.status()
        return status

    async def _store_failing(self) -> str | None:
        """Why commits fail, while they do. A failed webhook commit is checked again with a
        write of our own as large as the one that failed (a full disk may still take
        a small one), then taken back: a replica that /readyz takes out of the load
        balancer gets no webhooks, so it must find out by itself when the store is back."""
        stats = self.ingestor.stats
        if stats.failing is not None:
            # About what the failed message wrote: its history row, view row and change.
            probe = "x" * min(3 * stats.failing_bytes, 4 << 20)
            try:
                await self.store.set_meta("phasewatch:probe", probe)
                await self.store.set_meta("phasewatch:probe", None)
            except Exception as exc:
                return describe_error(exc)
            stats.failing = None
        return None

    @classmethod
    def from_settings(cls, settings: Settings) -> Service:
        subscriptions = load_subscriptions(settings.handler_refs(), settings)
        store = open_store(
            settings, record_updates=any(s.updates for s in subscriptions), serving=True
        )
        return cls(settings, store, subscriptions)

    async def _on_startup(self, app: web.Application) -> None:
        del app
        self.loop_lag.start(asyncio.get_running_loop())
        await self.store.open()
        await self.dispatcher.start()  # first: it fixes new handlers' starting point
        # Changes committed by other replicas (a shared database) wake dispatch too.
        await self.store.listen_changes(lambda: self.dispatcher.notify([]))
        await self.store.listen_changes(self.feed.notify)  # and the changes feed
        await self.retention.start()
        await self.stale.start()
        await self.ingestor.start()
        try:
            if self.kafka is not None:
                await self.kafka.start()
            if self.forwarder is not None:
                await self.forwarder.start()
        except BrokersUnreachable as exc:
            raise ConfigError(f"PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS: {exc}") from exc
        if self.reconcile is not None:
            await self.reconcile.start()
        if self.settings.webhook_secret is None:
            log.warning(
                "PHASEWATCH_WEBHOOK_SECRET is not set: UNSIGNED webhooks are accepted. "
                "Anyone who can reach this port can forge task events."
            )

    async def _on_cleanup(self, app: web.Application) -> None:
        del app
        if self.reconcile is not None:
            await self.reconcile.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self.kafka is not None:
            await self.kafka.stop()
        await self.ingestor.stop()
        await self.stale.stop()
        await self.dispatcher.stop()
        await self.retention.stop()
        await self.store.close()
        self.loop_lag.stop()


def _reconcile_loop(
    settings: Settings, store: Store, on_changes: Callable[[Sequence[ChangeRecord]], None]
) -> ReconcileLoop | None:
    """The reconcile loop, when a Studio API key is set and the interval is not 0."""
    every = settings.reconcile_every_s()
    key = settings.livepeer_api_key
    if key is None or every <= 0:
        return None
    url = settings.livepeer_api_url
    return ReconcileLoop(
        store,
        lambda: StudioClient(url, key.get_secret_value()),
        interval_s=every,
        overlap_ms=int(settings.reconcile_overlap_s * 1000),
        lease_s=settings.dispatch_lease_s,
        on_changes=on_changes,  # as the webhook ingestor's: dispatch wakes
    )


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully. Tracing (the ``otel`` extra and
    the ``OTEL_*`` variables, see :mod:`consumer.tracing`) is set up first, and its last
    spans exported once everything has stopped."""
    tracing.configure()
    try:
        await _serve(settings)
    finally:
        if tracing.enabled():
            await asyncio.to_thread(tracing.shutdown)


async def _serve(settings: Settings) -> None:
    # Signals first: a SIGTERM that arrives while the store opens (a rolling restart)
    # still stops the service cleanly instead of killing it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    service = Service.from_settings(settings)
    runner = web.AppRunner(
        service.app,
        access_log=logging.getLogger(ACCESS_LOGGER) if settings.access_log else None,
        access_log_class=AccessLogger,
        # Requests still in flight at a stop get this long (aiohttp's default is 60 s,
        # past the Kubernetes grace period in deploy/k8s); a webhook cut off gets no 2xx
        # and is sent again.
        shutdown_timeout=10.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"PHASEWATCH_HTTP_HOST/PHASEWATCH_HTTP_PORT: cannot listen on"
                f" {settings.http_host}:{settings.http_port}: {exc.strerror or exc}"
            ) from exc
        log.info(
            "phasewatch listening on http://%s:%d (store %s, %d handler(s))",
            settings.http_host,
            settings.http_port,
            _safe_url(settings.database_url),
            len(service.handlers),
        )
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def _safe_url(url: str) -> str:
    return redact_text(url)
