"""Probes and figures: ``/healthz`` (the process serves), ``/readyz`` (it can do its job:
the store answers and Kafka consumption has not stopped) and ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from consumer.api.context import LAG_KEY, LAG_LIMIT_KEY, STATUS_KEY
from consumer.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from consumer.api.metrics import render as render_metrics
from consumer.api.responses import error, json_response

__all__ = ["healthz", "metrics", "readyz"]


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the loop serving this answered, and has not been stuck for longer than
    the limit lately (a handler or a bug blocking it: restart). A loop stuck for good
    does not answer at all, and the probe's timeout says the same."""
    lag = request.app[LAG_KEY]()
    limit = request.app[LAG_LIMIT_KEY]
    if lag > limit:
        return error(503, "loop_stuck", f"the event loop ran {lag:.1f} s late (limit {limit:g} s)")
    return json_response({"status": "ok", "loopLagSeconds": round(lag, 4)})


async def readyz(request: web.Request) -> web.Response:
    try:
        status = await request.app[STATUS_KEY]()
    except Exception as exc:
        return error(503, "not_ready", f"store unavailable: {type(exc).__name__}")
    failing = status.get("storeFailing")
    if failing:
        return json_response(
            {"status": "not_ready", "error": "store_failing", "message": failing, **status},
            status=503,
        )
    kafka = status.get("kafka", {})
    if kafka.get("joinOverdue"):
        message = f"the Kafka consumer is not in its group {kafka.get('group')!s} yet"
        return json_response(
            {"status": "not_ready", "error": "kafka_not_joined", "message": message, **status},
            status=503,
        )
    failed = kafka.get("failed")
    if failed:
        return json_response(
            {"status": "not_ready", "error": "kafka_stopped", "message": failed, **status},
            status=503,
        )
    return json_response({"status": "ready", **status})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format of the readiness figures."""
    try:
        status = await request.app[STATUS_KEY]()
    except Exception as exc:
        return error(503, "not_ready", f"store unavailable: {type(exc).__name__}")
    response = web.Response(body=render_metrics(status))
    response.headers["Content-Type"] = METRICS_CONTENT_TYPE
    return response
