"""The OpenAPI 3.1 description of every route, served at ``GET /openapi.json``.

Written by hand, next to the routes it describes, and checked against them: a test holds
that the documented paths and methods are exactly the application's routes, and runs
schemathesis against a real ``phasewatch serve`` (no 5xx, every response as documented).
"""

from __future__ import annotations

from typing import Any

from consumer import __version__
from consumer.api.changes import MAX_WAIT_S
from consumer.api.context import MAX_PAGE
from consumer.api.dashboard import ASSETS

__all__ = ["document"]

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "The request can never succeed as sent: what is wrong is in the message.",
        401: "Missing, malformed, wrong or stale credentials.",
        404: "No such task.",
        410: "The cursor is older than the oldest change retained: re-list (GET /tasks), "
        "then resume from GET /changes without after.",
        413: "The body is above the size limit (before or after decoding).",
        415: "A Content-Encoding other than gzip or deflate.",
        422: "An event whose task cannot be used, or nested too deep.",
        503: "Our fault, not the sender's: retry later.",
    }
    return {str(s): _json(_ERROR, text[s]) for s in statuses}


_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_AUTH = {"401": _json(_ERROR, "With PHASEWATCH_API_TOKEN set: no or a wrong bearer token.")}


def document() -> dict[str, Any]:
    """The document (a new dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "phasewatch",
            "version": __version__,
            "description": "React to Livepeer task phase changes: the signed webhook receiver, "
            "the materialized tasks and their history, dead letters, and the probes. "
            "Credentials in tasks are hidden in every answer.",
        },
        "paths": {
            "/webhooks/livepeer": {
                "post": {
                    "summary": "Receive a Livepeer webhook (signed)",
                    "description": "2xx once the event is committed (or was already); 4xx "
                    "never succeed on a retry; 503 only for our own faults.",
                    "parameters": [
                        {
                            "name": "Livepeer-Signature",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "t=<ms>,v1=<hex HMAC-SHA256 of the body>; "
                            "required when PHASEWATCH_WEBHOOK_SECRET is set.",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "status": {"enum": ["accepted", "duplicate", "forwarded"]}
                                },
                                "required": ["status"],
                            },
                            "Committed (accepted), already committed (duplicate), or in "
                            "forward mode produced to Kafka (forwarded).",
                        ),
                        **_errors(400, 401, 413, 415, 422, 503),
                    },
                }
            },
            "/tasks": {
                "get": {
                    "summary": "List materialized tasks by status.updatedAt",
                    "parameters": [
                        _query("phase", "Comma-separated phases (repeatable)."),
                        _query("type", "Comma-separated task types (repeatable)."),
                        _query(
                            "updated_since",
                            "status.updatedAt at or after (ISO-8601 or ms).",
                            min_length=1,
                        ),
                        _query("cursor", "nextCursor of the previous page.", min_length=1),
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        },
                        {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "tasks": {"type": "array", "items": {"type": "object"}},
                                    "nextCursor": {"type": ["string", "null"]},
                                },
                                "required": ["tasks", "nextCursor"],
                            },
                            "A page of tasks, credentials hidden.",
                        ),
                        **_errors(400),
                        **_AUTH,
                    },
                }
            },
            "/tasks/{task_id}": {
                "get": {
                    "summary": "One materialized task (credentials hidden)",
                    "parameters": [_TASK_ID],
                    "responses": {
                        "200": _json({"type": "object"}, "The task; ETag is its version."),
                        **_errors(404),
                        **_AUTH,
                    },
                }
            },
            "/tasks/{task_id}/history": {
                "get": {
                    "summary": "A task's events in arrival order and its phase changes",
                    "parameters": [_TASK_ID],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "taskId": {"type": "string"},
                                    "events": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "verifiedBy": {
                                                    "type": ["string", "null"],
                                                    "description": "The name (else the "
                                                    "0-based index) of the webhook secret "
                                                    "that verified the delivery; null when "
                                                    "none did (unsigned, Kafka, imports).",
                                                }
                                            },
                                        },
                                    },
                                    "phaseChanges": {
                                        "type": "array",
                                        "items": {"type": "object"},
                                    },
                                },
                                "required": ["taskId", "events", "phaseChanges"],
                            },
                            "The history; a body that cannot be shown has bodyError.",
                        ),
                        **_errors(404),
                        **_AUTH,
                    },
                }
            },
            "/changes": {
                "get": {
                    "summary": "Recorded changes in commit order, from a cursor (long-poll)",
                    "description": "Follow every change: start without after (the oldest "
                    "change retained) or with after=now, then pass next as after. next moves "
                    "past every row examined, matched or not. With wait, an empty answer "
                    "waits up to that many seconds for a change to commit. Only the listed "
                    "fields of a change appear, never the task. An after older than "
                    "retention kept is 410: re-list (GET /tasks), then start again.",
                    "parameters": [*_CHANGE_FILTERS, _LIMIT, _WAIT],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "changes": {"type": "array", "items": _CHANGE_REF},
                                    "next": {"type": "string"},
                                },
                                "required": ["changes", "next"],
                            },
                            "A page of changes (maybe empty) and the cursor to go on from.",
                        ),
                        **_errors(400, 410),
                        **_AUTH,
                    },
                }
            },
            "/changes/stream": {
                "get": {
                    "summary": "Recorded changes as server-sent events, live",
                    "description": "text/event-stream: each change is an event with "
                    "id: <cursor>, event: change and data: the change as in GET /changes; "
                    "an id-only block moves the id past rows no filter matched; a comment "
                    "': keep-alive' while idle (PHASEWATCH_CHANGES_HEARTBEAT_S). Resumes "
                    "after the Last-Event-ID header, else after. A client too slow to take "
                    "the events is disconnected (it resumes from its last id). If "
                    "retention overtakes the stream, an event 'gone' ends it: re-list. "
                    "With PHASEWATCH_API_TOKEN set, a browser's EventSource (which "
                    "cannot send headers) may pass the token as ?token= instead of "
                    "the Authorization header; it is compared in constant time. Only "
                    "this route takes ?token=.",
                    "parameters": [
                        *_CHANGE_FILTERS,
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "The id of the last event received; wins over "
                            "after (EventSource sends it when it reconnects).",
                        },
                        _query(
                            "token",
                            "The API token (for EventSource), instead of the Authorization header.",
                        ),
                    ],
                    "responses": {
                        "200": {
                            "description": "The stream of events.",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(400, 410),
                        **_AUTH,
                    },
                }
            },
            "/dead-letters": {
                "get": {
                    "summary": "Deliveries that failed for good",
                    "parameters": [
                        _query("handler", "Only this handler's."),
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "deadLetters": {"type": "array", "items": {"type": "object"}}
                                },
                                "required": ["deadLetters"],
                            },
                            "Dead letters, each with its change and last error.",
                        ),
                        **_errors(400),
                        **_AUTH,
                    },
                }
            },
            "/dead-letters/retry": _move("Deliver dead letters again (attempts start over)"),
            "/dead-letters/drop": _move("Give up on dead letters"),
            "/healthz": {
                "get": {
                    "summary": "Liveness: the loop serving HTTP answers in time",
                    "responses": {
                        "200": _json({"type": "object"}, "Alive."),
                        "503": _json(_ERROR, "The loop ran too late: restart."),
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness and the service's figures",
                    "responses": {
                        "200": _json({"type": "object"}, "Ready; the figures."),
                        "503": _json(
                            {"type": "object"},
                            "Not ready (store failing, Kafka stopped or out of its group).",
                        ),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "The figures in the Prometheus text format",
                    "responses": {
                        "200": {
                            "description": "Prometheus exposition.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "503": _json(_ERROR, "The store is unavailable."),
                        **_AUTH,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
                }
            },
            **_dashboard_paths(),
        },
        "components": {
            "schemas": {
                "Change": {
                    "type": "object",
                    "properties": {
                        "cursor": {"type": "string"},
                        "taskId": {"type": "string"},
                        "type": {"type": ["string", "null"]},
                        "previousPhase": {"type": ["string", "null"]},
                        "phase": {"type": "string"},
                        "changedAt": {"type": "number"},
                        "eventId": {"type": "string"},
                        "kind": {"enum": ["phase", "update", "stale"]},
                    },
                    "required": [
                        "cursor",
                        "taskId",
                        "type",
                        "previousPhase",
                        "phase",
                        "changedAt",
                        "eventId",
                        "kind",
                    ],
                },
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                    "required": ["error", "message"],
                },
            }
        },
    }


_CHANGE_REF = {"$ref": "#/components/schemas/Change"}
_LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
    "description": "Most changes in the answer (default 100).",
}
_WAIT = {
    "name": "wait",
    "in": "query",
    "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S},
    "description": "Seconds to wait for a change to commit when there is none (default 0).",
}


def _query(name: str, description: str, *, min_length: int = 0) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if min_length:
        schema["minLength"] = min_length
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _move(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "seqs": {"type": "array", "items": {"type": "integer"}},
                                "all": {"type": "boolean"},
                                "handler": {"type": ["string", "null"]},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"moved": {"type": "integer"}, "to": {"type": "string"}},
                        "required": ["moved", "to"],
                    },
                    "How many dead letters moved.",
                ),
                **_errors(400),
                **_AUTH,
            },
        }
    }


_CHANGE_FILTERS = [
    _query(
        "after",
        "A cursor (a change's cursor, or next) to start after, or now (only changes "
        "committed from here on). Unset: from the oldest change retained.",
        min_length=1,
    ),
    _query(
        "kind",
        "phase (default): phase changes; update: other changes of a task (recorded when "
        "a handler asks for updates); comma-separated, or all.",
    ),
    _query("phase", "Comma-separated phases changed to (repeatable)."),
    _query("type", "Comma-separated task types (repeatable)."),
    _query("taskId", "Only this task's changes (repeatable)."),
]


def _dashboard_paths() -> dict[str, Any]:
    """The dashboard (consumer.api.dashboard): the page and its assets, served without
    credentials (they hold no data), and the two figures only the page needs."""
    secured = "Served with a strict Content-Security-Policy, nosniff and no-referrer."

    def page(summary: str, media: str, description: str) -> dict[str, Any]:
        return {
            "get": {
                "summary": summary,
                "description": secured,
                "responses": {
                    "200": {
                        "description": description,
                        "content": {media: {"schema": {"type": "string"}}},
                    }
                },
            }
        }

    nullable_ms = {"type": ["integer", "null"]}
    return {
        "/": page("The dashboard (HTML)", "text/html", "The page; its script asks for the token."),
        "/favicon.ico": page("The icon (SVG)", "image/svg+xml", "The icon."),
        "/favicon.svg": page("The icon (SVG)", "image/svg+xml", "The icon."),
        "/static/{name}": {
            "get": {
                "summary": "The dashboard's scripts (ES modules), style sheet and icon",
                "description": secured,
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": sorted(ASSETS)},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The asset.",
                        "content": {
                            media: {"schema": {"type": "string"}}
                            for media in sorted({t.split(";")[0] for t in ASSETS.values()})
                        },
                    },
                    "404": _json(_ERROR, "No such asset."),
                },
            }
        },
        "/dashboard/config": {
            "get": {
                "summary": "What the page needs first: whether the API wants a token",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "tokenRequired": {"type": "boolean"},
                                "phases": {"type": "array", "items": {"type": "string"}},
                                "types": {"type": "array", "items": {"type": "string"}},
                                "intervalSeconds": {"type": "number"},
                            },
                            "required": ["tokenRequired", "phases", "types", "intervalSeconds"],
                        },
                        "The page's settings (no data).",
                    )
                },
            }
        },
        "/dashboard/series": {
            "get": {
                "summary": "Events/s and changes/s over the last hour; handler latency",
                "description": "One point per interval (10 s), sampled from the store's "
                "counters by this process; each handler's delivery latency (commit to the "
                "handler's return) over the last 10 minutes, measured on a sample of "
                "recent changes.",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "intervalSeconds": {"type": "number"},
                                "windowSeconds": {"type": "number"},
                                "now": {"type": "integer"},
                                "points": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "t": {"type": "integer"},
                                            "seconds": {"type": "number"},
                                            "eventsPerSecond": {"type": "number"},
                                            "changesPerSecond": {"type": "number"},
                                        },
                                        "required": [
                                            "t",
                                            "seconds",
                                            "eventsPerSecond",
                                            "changesPerSecond",
                                        ],
                                    },
                                },
                                "handlers": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "type": "object",
                                        "properties": {
                                            "samples": {"type": "integer"},
                                            "p50Ms": nullable_ms,
                                            "p95Ms": nullable_ms,
                                            "maxMs": nullable_ms,
                                            "windowSeconds": {"type": "integer"},
                                        },
                                    },
                                },
                            },
                            "required": ["intervalSeconds", "windowSeconds", "now", "points"],
                        },
                        "The series, oldest point first.",
                    ),
                    **_AUTH,
                },
            }
        },
        "/dashboard/phases": {
            "get": {
                "summary": "How many tasks are in each phase",
                "description": "Counted from the view, each phase up to 10,000 (a phase "
                "in capped has at least that many); other: tasks in phases phasewatch "
                "does not know (null when a count is capped). Cached for 2 s.",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "total": {"type": "integer"},
                                "phases": {
                                    "type": "object",
                                    "additionalProperties": {"type": "integer"},
                                },
                                "capped": {"type": "array", "items": {"type": "string"}},
                                "other": {"type": ["integer", "null"]},
                            },
                            "required": ["total", "phases", "capped", "other"],
                        },
                        "The counts.",
                    ),
                    **_AUTH,
                },
            }
        },
    }
