"""Prometheus exposition of the service's figures (``GET /metrics``).

The figures already exist (the readiness payload: store counts, ingestion, dispatch per
handler, Kafka per partition); this module only renders them, at scrape time, in the
Prometheus text format with ``prometheus_client``. Labels are handler names, topics and
partitions: nothing from a task, so nothing a credential could hide in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot(Collector):
    def __init__(self, status: Mapping[str, Any]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status
        yield _gauge("phasewatch_events", "Events in the history.", s["events"])
        yield _gauge("phasewatch_tasks", "Tasks in the materialized view.", s["tasks"])
        yield _gauge("phasewatch_changes", "Changes recorded in the outbox.", s["changes"])
        yield _gauge(
            "phasewatch_pending_changes",
            "Changes this process still has to hand to handlers.",
            s["pendingChanges"],
        )
        for name, value in s.get("store", {}).items():
            # The backend's own figures (e.g. the SQLite writer's refused plans).
            yield _counter(f"phasewatch_store_{name}", f"Store backend: {name}.", value)
        lag = GaugeMetricFamily(
            "phasewatch_loop_lag_seconds",
            "How late each event loop runs its callbacks: the receiver's, and each handler's.",
            labels=["loop"],
        )
        lag.add_metric(["main"], s.get("loopLagSeconds", 0.0))
        for handler, figures in s["dispatch"]["handlers"].items():
            lag.add_metric([f"handler:{handler}"], figures.get("loopLagSeconds", 0.0))
        yield lag
        yield _gauge(
            "phasewatch_store_failing",
            "1 while store commits fail (/readyz answers 503 and names the error).",
            int(bool(s.get("storeFailing"))),
        )
        ingest = s["ingest"]
        yield _counter(
            "phasewatch_webhook_events_accepted", "Webhook events committed.", ingest["accepted"]
        )
        yield _counter(
            "phasewatch_webhook_events_duplicate",
            "Webhook events already stored.",
            ingest["duplicates"],
        )
        yield _counter(
            "phasewatch_webhook_events_rejected",
            "Webhook bodies that are not a usable event (answered 400 or 422).",
            ingest["rejected"],
        )
        yield _counter(
            "phasewatch_webhook_commits", "Group commits of webhook events.", ingest["batches"]
        )
        yield _counter(
            "phasewatch_webhook_commit_failures", "Webhook events not committed.", ingest["failed"]
        )
        dispatch = s["dispatch"]
        yield _gauge(
            "phasewatch_dispatch_leader", "1 when this process dispatches.", int(dispatch["leader"])
        )
        per_handler = {
            "delivered": (CounterMetricFamily, "Changes a handler returned for."),
            "failures": (CounterMetricFamily, "Failed handler calls (each retry counts)."),
            "dead": (CounterMetricFamily, "Deliveries dead-lettered."),
            "queued": (GaugeMetricFamily, "Changes queued in memory for a handler."),
            "inFlight": (GaugeMetricFamily, "Handler calls running now."),
        }
        for key, (family, text) in per_handler.items():
            name = "phasewatch_handler_" + _snake(key)
            metric = family(name, text, labels=["handler"])
            for handler, figures in dispatch["handlers"].items():
                metric.add_metric([handler], figures[key])
            yield metric
        kafka = s.get("kafka")
        if kafka is not None:
            yield _counter("phasewatch_kafka_records", "Kafka records processed.", kafka["records"])
            yield _counter(
                "phasewatch_kafka_poison", "Kafka records sent to the DLQ.", kafka["poison"]
            )
            yield _counter(
                "phasewatch_kafka_commit_failures",
                "Offset commits that failed.",
                kafka["commitFailures"],
            )
            lag = GaugeMetricFamily(
                "phasewatch_kafka_lag", "Records behind, per partition.", labels=["partition"]
            )
            for partition, behind in kafka["lag"].items():
                lag.add_metric([partition], behind)
            yield lag
        reconcile = s.get("reconcile")
        if reconcile is not None:
            yield from _reconcile(reconcile)
        stale = s.get("stale")
        if stale is not None:
            tasks = GaugeMetricFamily(
                "phasewatch_tasks_stale",
                "Tasks in a watched phase with no newer snapshot for its shortest stale_for,"
                " per phase (alerted or not), as last counted.",
                labels=["phase"],
            )
            for phase, count in sorted(stale["staleTasks"].items()):
                tasks.add_metric([phase], count)
            yield tasks


RECONCILE_ERROR_KINDS = ("auth", "rate_limited", "server", "network", "response")


def _reconcile(r: Mapping[str, Any]) -> Iterator[Metric]:
    """The reconcile loop's figures (Studio's task list, spec §7)."""
    yield _gauge(
        "phasewatch_reconcile_leader", "1 when this replica runs the reconcile passes.", r["leader"]
    )
    yield _counter("phasewatch_reconcile_passes", "Reconcile passes run.", r["passes"])
    yield _counter(
        "phasewatch_reconcile_failed_passes", "Reconcile passes that failed.", r["failedPasses"]
    )
    yield _counter(
        "phasewatch_reconcile_requests", "Requests made to Studio's task list.", r["requests"]
    )
    yield _counter(
        "phasewatch_reconcile_tasks_seen", "Task snapshots read from Studio.", r["tasksSeen"]
    )
    yield _counter(
        "phasewatch_reconcile_tasks_repaired",
        "Tasks whose Studio snapshot changed the view: missed by the webhooks.",
        r["tasksRepaired"],
    )
    errors = CounterMetricFamily(
        "phasewatch_reconcile_errors",
        "Failed requests to Studio (each retry counts), by kind.",
        labels=["kind"],
    )
    for kind in sorted({*RECONCILE_ERROR_KINDS, *r["errors"]}):
        errors.add_metric([kind], r["errors"].get(kind, 0))
    yield errors
    last = r["lastSuccessMs"]
    yield _gauge(
        "phasewatch_reconcile_last_success_timestamp_seconds",
        "When the last reconcile pass completed (Unix seconds; 0: never).",
        0 if last is None else last / 1000,
    )


def render(status: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition of a readiness payload."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(status))
    return generate_latest(registry)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
