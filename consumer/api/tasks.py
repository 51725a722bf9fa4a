"""The read API: ``GET /tasks``, ``/tasks/{id}`` and ``/tasks/{id}/history``. Every task
leaving through it has its credentials hidden (:mod:`consumer.core.secrets`)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from consumer.api.context import MAX_PAGE, STORE_KEY
from consumer.api.responses import error, json_response
from consumer.core.codec import MAX_DEPTH, depth
from consumer.core.secrets import redact
from consumer.core.times import parse_time
from consumer.store.base import Cursor, TaskQuery

__all__ = ["get_task", "list_tasks", "task_history"]


async def get_task(request: web.Request) -> web.Response:
    stored = await request.app[STORE_KEY].get_task(request.match_info["task_id"])
    if stored is None:
        return error(404, "not_found", "no task with this id")
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
    unknown = set(q) - _TASK_PARAMS
    if unknown:
        # Not echoed: names come from the request. The known ones say what is wrong.
        raise ValueError(f"unknown query parameter; known: {', '.join(sorted(_TASK_PARAMS))}")
    phases = tuple(p for v in q.getall("phase", []) for p in v.split(",") if p)
    types = tuple(t for v in q.getall("type", []) for t in v.split(",") if t)
    since = parse_time(q["updated_since"]) if "updated_since" in q else None
    try:
        limit = int(q.get("limit", "100")[:20])
    except ValueError:
        raise ValueError("limit must be an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    order = q.get("order", "asc")
    if order not in ("asc", "desc"):
        raise ValueError("order must be asc or desc")
    after = Cursor.decode(q["cursor"]) if "cursor" in q else None
    return TaskQuery(phases, types, since, after, limit, order == "desc")


_TASK_PARAMS = frozenset({"phase", "type", "updated_since", "cursor", "limit", "order"})


def _body(raw: bytes) -> dict[str, Any]:
    """A stored body as the history shows it, redacted. Whatever the history holds (a body
    stored before the codec's nesting limit, bytes that no longer parse), the answer is
    a 200 that says what could not be shown, never a 500 for good."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"body": None, "bodyError": "the stored body is not JSON"}
    if depth(doc) > MAX_DEPTH:
        return {"body": None, "bodyError": f"the stored body nests over {MAX_DEPTH} levels"}
    return {"body": redact(doc)}


async def task_history(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    store = request.app[STORE_KEY]
    events = await store.task_history(task_id)
    if not events:
        return error(404, "not_found", "no task with this id")
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
                    # The name (or index) of the webhook secret that verified it, if any.
                    "verifiedBy": None if e.receipt is None else e.receipt.secret,
                    **_body(e.raw),
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
