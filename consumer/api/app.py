"""The HTTP surface (aiohttp), assembled: the webhook receiver
(:mod:`consumer.sources.webhook`), the read API (:mod:`consumer.api.tasks`), the changes
feed (:mod:`consumer.api.changes`), dead-letter administration (:mod:`consumer.api.admin`)
and the probes (:mod:`consumer.api.health`), and the dashboard
(:mod:`consumer.api.dashboard`), behind one error middleware and, with a token, one auth
middleware. The only module that builds an aiohttp application.

Every error body is JSON: ``{"error": <code>, "message": <what was wrong>}``; an
unexpected exception is a 500 that never leaks internals.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from consumer.api import admin, changes, dashboard, health, tasks
from consumer.api.changes import FEED_KEY, STREAM_PATH, ChangeFeed
from consumer.api.context import LAG_KEY, LAG_LIMIT_KEY, STATUS_KEY, STORE_KEY, ApiStore, StatusFn
from consumer.api.openapi import document
from consumer.api.responses import bad_encoding, error, json_response
from consumer.sources.webhook import WEBHOOK_PATH, EventSink, WebhookConfig, webhook_handler

__all__ = ["HttpConfig", "StatusFn", "build_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    webhook_secret: bytes | None = None
    tolerance_ms: int = 300_000
    max_body_bytes: int = 1024 * 1024
    api_token: str | None = None
    liveness_max_lag_s: float = 10.0


async def _openapi(request: web.Request) -> web.Response:
    del request
    return json_response(document())


def build_app(
    store: ApiStore,
    sink: EventSink,
    config: HttpConfig,
    status: StatusFn,
    loop_lag: Callable[[], float] = lambda: 0.0,
    *,
    feed: ChangeFeed | None = None,
) -> web.Application:
    """``feed``: the changes feed's broadcaster, which the service notifies of commits
    (a new one, never notified, when not given: readers then find changes on their
    heartbeat re-reads only)."""
    # client_max_size makes aiohttp refuse larger bodies while reading (413) instead of
    # buffering them; Content-Length is checked before reading anything.
    # The auth middleware only exists when a token is configured: nothing per request else.
    middlewares = [_errors] if config.api_token is None else [_errors, _auth(config.api_token)]
    # auto_decompress off: the webhook receiver undoes Content-Encoding itself, so that a
    # body that does not decode gets a JSON 400 (see consumer.sources.webhook.decoded).
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=middlewares,
        handler_args={"auto_decompress": False},
    )
    app[STORE_KEY] = store
    app[STATUS_KEY] = status
    app[LAG_KEY] = loop_lag
    app[LAG_LIMIT_KEY] = config.liveness_max_lag_s
    app[FEED_KEY] = feed = feed or ChangeFeed()
    app.on_shutdown.append(feed.close)  # long-polls answer, streams end: a prompt stop
    webhook = WebhookConfig(config.webhook_secret, config.tolerance_ms, config.max_body_bytes)
    app.router.add_post(WEBHOOK_PATH, webhook_handler(sink, webhook))
    app.router.add_get("/tasks", tasks.list_tasks)
    app.router.add_get("/tasks/{task_id}", tasks.get_task)
    app.router.add_get("/tasks/{task_id}/history", tasks.task_history)
    app.router.add_get("/changes", changes.list_changes)
    app.router.add_get(STREAM_PATH, changes.stream_changes)
    app.router.add_get("/dead-letters", admin.list_dead_letters)
    app.router.add_post("/dead-letters/retry", admin.retry_dead_letters)
    app.router.add_post("/dead-letters/drop", admin.drop_dead_letters)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/openapi.json", _openapi)
    dashboard.setup(app, token_required=config.api_token is not None)
    return app


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
        response = error(exc.status, code, exc.text or exc.reason)
        # Headers the status needs (Allow on a 405) survive the JSON body.
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except web.RequestPayloadError:
        return bad_encoding()
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error(500, "internal_error", "internal error; see the service log")


# Webhooks carry their own signature; probes must work without credentials; the
# dashboard's page and assets hold no data (the page asks for the token itself).
_OPEN_PATHS = (
    frozenset({WEBHOOK_PATH, "/healthz", "/readyz", "/openapi.json"}) | dashboard.OPEN_PATHS
)


def _auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()
    bare = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            # A browser's EventSource cannot set headers: the stream also takes ?token=.
            if request.path == STREAM_PATH and "Authorization" not in request.headers:
                query_token = request.query.get("token", "").encode()
                ok = bool(query_token) and hmac.compare_digest(query_token, bare)
            else:
                ok = hmac.compare_digest(given, expected)
            if not ok:
                return error(401, "unauthorized", "this API requires Authorization: Bearer <token>")
        return await handler(request)

    return auth
