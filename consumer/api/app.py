"""The HTTP surface (aiohttp): the Livepeer webhook receiver, the read API and health.
The only module that serves HTTP.

Status codes follow from Livepeer's retry policy (spec §2): it retries 5xx and timeouts
for about a day and never retries a 4xx. So a 2xx means the event is committed (or was
already), a 4xx means the input can never succeed, and a 5xx (503) is reserved for our
own faults, when a retry may well succeed::

    200  accepted, or a duplicate of an accepted event
    400  not JSON, or not an event envelope
    401  missing, malformed or wrong signature; stale signature timestamp
    413  body above the size limit
    422  an event whose task cannot be used (no id, no status.phase, ...)
    503  the store could not commit; retry

Every error body is JSON: ``{"error": <code>, "message": <what was wrong>}``.
Every task leaving through the API has its credentials hidden (consumer.core.secrets).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from consumer.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from consumer.api.metrics import render as render_metrics
from consumer.core.change import ChangeRecord
from consumer.core.codec import HTTP_STATUS
from consumer.core.secrets import redact, redact_text
from consumer.core.signature import SignatureError, verify
from consumer.core.times import parse_time
from consumer.store.base import Cursor, Delivery, DeliveryStatus, Rejected, Store, TaskQuery

__all__ = ["EventSink", "HttpConfig", "StatusFn", "build_app"]

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/livepeer"
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class HttpConfig:
    webhook_secret: bytes | None = None
    tolerance_ms: int = 300_000
    max_body_bytes: int = 1024 * 1024
    api_token: str | None = None


class EventSink(Protocol):
    """Where a verified webhook body goes: the store (via the group-commit ingestor) or,
    in forward mode, a Kafka topic. Returns a status word once the event is durable, or
    what is wrong with the body (nothing of it is kept then)."""

    async def submit(self, raw: bytes) -> str | Rejected: ...


StatusFn = Callable[[], Awaitable[dict[str, Any]]]

STORE_KEY = web.AppKey("store", Store)
SINK_KEY = web.AppKey("sink", EventSink)
CONFIG_KEY = web.AppKey("config", HttpConfig)
STATUS_KEY: web.AppKey[StatusFn] = web.AppKey("status")


def json_response(body: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": code, "message": message}, status=status)


def build_app(
    store: Store, sink: EventSink, config: HttpConfig, status: StatusFn
) -> web.Application:
    # client_max_size makes aiohttp refuse larger bodies while reading (413) instead of
    # buffering them; Content-Length is checked before reading anything.
    # The auth middleware only exists when a token is configured: nothing per request else.
    middlewares = [_errors] if config.api_token is None else [_errors, _auth(config.api_token)]
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[STORE_KEY] = store
    app[SINK_KEY] = sink
    app[CONFIG_KEY] = config
    app[STATUS_KEY] = status
    app.router.add_post(WEBHOOK_PATH, receive_webhook)
    app.router.add_get("/tasks", list_tasks)
    app.router.add_get("/tasks/{task_id}", get_task)
    app.router.add_get("/tasks/{task_id}/history", task_history)
    app.router.add_get("/dead-letters", list_dead_letters)
    app.router.add_post("/dead-letters/retry", retry_dead_letters)
    app.router.add_post("/dead-letters/drop", drop_dead_letters)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


# ---------------------------------------------------------------- middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON; an unexpected exception is a 500 that never leaks internals."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error(exc.status, code, exc.text or exc.reason)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error(500, "internal_error", "internal error; see the service log")


# Webhooks carry their own signature; probes must work without credentials.
_OPEN_PATHS = frozenset({WEBHOOK_PATH, "/healthz", "/readyz"})


def _auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error(401, "unauthorized", "this API requires Authorization: Bearer <token>")
        return await handler(request)

    return auth


# ---------------------------------------------------------------- webhook


async def receive_webhook(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    length = request.content_length
    if length is not None and length > config.max_body_bytes:
        return _too_large(config)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _too_large(config)
    if config.webhook_secret is not None:
        try:
            verify(
                request.headers.get("Livepeer-Signature"),
                body,
                config.webhook_secret,
                now_ms=time.time_ns() // 1_000_000,
                tolerance_ms=config.tolerance_ms,
            )
        except SignatureError as exc:
            return error(401, "bad_signature", str(exc))
    try:
        # Decoded where it is stored (by default in the writer process): a body that is
        # not an event comes back rejected, with what is wrong.
        outcome = await request.app[SINK_KEY].submit(body)
    except Exception:
        # Our fault, not the sender's: 503 so Livepeer retries later.
        log.exception("could not make a webhook body durable")
        return error(503, "store_unavailable", "event not committed; retry later")
    if isinstance(outcome, Rejected):
        return error(HTTP_STATUS[outcome.reason], outcome.reason, outcome.message)
    return json_response({"status": str(outcome)})


def _too_large(config: HttpConfig) -> web.Response:
    return error(413, "too_large", f"body exceeds the {config.max_body_bytes} byte limit")


# ---------------------------------------------------------------- read API


async def get_task(request: web.Request) -> web.Response:
    stored = await request.app[STORE_KEY].get_task(request.match_info["task_id"])
    if stored is None:
        return error(404, "not_found", f"no task {request.match_info['task_id']!r}")
    return json_response(redact(stored.task), ETag=f'"{stored.version}"')


async def list_tasks(request: web.Request) -> web.Response:
    try:
        query = _task_query(request)
    except ValueError as exc:
        return error(400, "bad_query", str(exc))
    page = await request.app[STORE_KEY].list_tasks(query)
    return json_response(
        {
            "tasks": [redact(t.task) for t in page.tasks],
            "nextCursor": page.next_cursor.encode() if page.next_cursor else None,
        }
    )


def _task_query(request: web.Request) -> TaskQuery:
    q = request.query
    unknown = set(q) - {"phase", "type", "updated_since", "cursor", "limit", "order"}
    if unknown:
        raise ValueError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    phases = tuple(p for v in q.getall("phase", []) for p in v.split(",") if p)
    types = tuple(t for v in q.getall("type", []) for t in v.split(",") if t)
    since = parse_time(q["updated_since"]) if "updated_since" in q else None
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        raise ValueError("limit must be an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    order = q.get("order", "asc")
    if order not in ("asc", "desc"):
        raise ValueError("order must be asc or desc")
    after = Cursor.decode(q["cursor"]) if "cursor" in q else None
    return TaskQuery(phases, types, since, after, limit, order == "desc")


async def task_history(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    store = request.app[STORE_KEY]
    events = await store.task_history(task_id)
    if not events:
        return error(404, "not_found", f"no task {task_id!r}")
    changes = await store.task_changes(task_id)
    return json_response(
        {
            "taskId": task_id,
            "events": [
                {
                    "seq": e.seq,
                    "eventId": e.event_id,
                    "event": e.kind,
                    "format": e.format.value,
                    "source": e.source,
                    "receivedAt": e.received_at,
                    "createdAt": e.created_at,
                    "body": redact(orjson.loads(e.raw)),
                }
                for e in events
            ],
            "phaseChanges": [
                {
                    "seq": c.seq,
                    "eventId": c.event_id,
                    "previousPhase": c.previous_phase,
                    "phase": c.phase,
                    "changedAt": c.changed_at,
                    "recordedAt": c.recorded_at,
                }
                for c in changes
            ],
        }
    )


# ---------------------------------------------------------------- dead letters


async def list_dead_letters(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return error(400, "bad_query", "limit must be an integer")
    if not 1 <= limit <= MAX_PAGE:
        return error(400, "bad_query", f"limit must be between 1 and {MAX_PAGE}")
    dead = await store.list_deliveries([DeliveryStatus.DEAD], request.query.get("handler"), limit)
    changes = {c.seq: c for c in await store.changes_by_seq([d.seq for d in dead])}
    return json_response({"deadLetters": [_dead_letter(d, changes.get(d.seq)) for d in dead]})


def _dead_letter(d: Delivery, change: ChangeRecord | None) -> dict[str, Any]:
    return {
        "handler": d.handler,
        "seq": d.seq,
        "attempts": d.attempts,
        "error": redact_text(d.error or ""),
        "firstAttemptAt": d.first_attempt_at,
        "lastAttemptAt": d.last_attempt_at,
        "taskId": change.task_id if change else None,
        "previousPhase": change.previous_phase if change else None,
        "phase": change.phase if change else None,
        "kind": change.kind if change else None,
    }


async def retry_dead_letters(request: web.Request) -> web.Response:
    return await _move_dead(request, DeliveryStatus.REDRIVE)


async def drop_dead_letters(request: web.Request) -> web.Response:
    return await _move_dead(request, DeliveryStatus.DROPPED)


async def _move_dead(request: web.Request, to: DeliveryStatus) -> web.Response:
    """Body: ``{"handler": optional, "seqs": optional [int], "all": bool}``; without seqs,
    ``all`` must be true, so an empty body never re-drives or drops everything."""
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        return error(400, "not_json", "body must be a JSON object")
    if not isinstance(body, dict):
        return error(400, "bad_request", "body must be a JSON object")
    handler, seqs = body.get("handler"), body.get("seqs")
    if handler is not None and not isinstance(handler, str):
        return error(400, "bad_request", "handler must be a string")
    if seqs is not None and not (
        isinstance(seqs, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seqs)
    ):
        return error(400, "bad_request", "seqs must be a list of integers")
    if seqs is None and body.get("all") is not True:
        return error(400, "bad_request", 'name the seqs, or pass "all": true')
    moved = await request.app[STORE_KEY].set_delivery_status(
        DeliveryStatus.DEAD, to, handler=handler, seqs=seqs
    )
    return json_response({"moved": moved, "to": to.value})


# ---------------------------------------------------------------- health


async def healthz(request: web.Request) -> web.Response:
    del request
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        status = await request.app[STATUS_KEY]()
    except Exception as exc:
        return error(503, "not_ready", f"store unavailable: {type(exc).__name__}")
    failed = status.get("kafka", {}).get("failed")
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
