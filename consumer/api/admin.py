"""Dead letters: list them, re-drive them (``retry``) or give up on them (``drop``)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from consumer.api.context import MAX_PAGE, STORE_KEY
from consumer.api.responses import error, json_response
from consumer.core.change import ChangeRecord
from consumer.core.secrets import redact_text
from consumer.store.base import Delivery, DeliveryStatus

__all__ = ["drop_dead_letters", "list_dead_letters", "retry_dead_letters"]


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


def _is_seq(value: object) -> bool:
    # Within the 64-bit integers a database column holds: beyond, no seq can match.
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


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
    if seqs is not None and not (isinstance(seqs, list) and all(map(_is_seq, seqs))):
        return error(400, "bad_request", "seqs must be a list of 64-bit integers")
    if "all" in body and not isinstance(body["all"], bool):
        return error(400, "bad_request", "all must be true or false")
    if seqs is None and body.get("all") is not True:
        return error(400, "bad_request", 'name the seqs, or pass "all": true')
    moved = await request.app[STORE_KEY].set_delivery_status(
        DeliveryStatus.DEAD, to, handler=handler, seqs=seqs
    )
    return json_response({"moved": moved, "to": to.value})
