"""A stand-in for Livepeer Studio's task list, ``GET /api/task`` (spec §7), with the
quirks a reconciler has to live with, as Studio's source has them
(``packages/api/src/controllers/task.ts``, ``controllers/helpers.ts``):

* ``Authorization: Bearer <key>``; a missing or wrong key gets 401;
* ``limit`` defaults to 20 and is capped (1000 at Studio; lower here so that a few
  tasks make several pages) without saying so;
* ``order`` defaults to newest first (``updatedAt-true,createdAt-true``);
  ``FIELD-false`` is ascending; ``updatedAt`` is ``status.updatedAt``;
* ``filters``: a JSON array of ``{"id", "value": {"gt"|"gte"|"lt"|"lte": n}}``; a bare
  value (equality) is compared as text with the number, so it matches nothing;
* the cursor is an OFFSET into the current result, handed out in ``Link: <...>;
  rel="next"`` whenever a page is full (even when nothing follows): rows that change
  between two pages are skipped or seen twice;
* ``count=1`` adds ``X-Total-Count``;
* scripted faults: 429 (with ``Retry-After``) and 5xx, one per request, in order.

``before_page`` runs before each answer, so a test can change tasks between two pages
of a walk. ``requests`` keeps every query as received.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

FIELDS = {"id", "name", "createdAt", "updatedAt", "userId", "type"}
DEFAULT_ORDER = "updatedAt-true,createdAt-true"


@dataclass
class Fault:
    status: int
    retry_after: str | None = None


@dataclass
class StudioStandin:
    api_key: str = "sk_test_standin"
    max_limit: int = 1000
    honour_order: bool = True  # False: `order` is ignored (newest first, always)
    link_base: str | None = None  # where Link: next points (default: this server)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    before_page: Callable[[int], None] | None = None  # called with the request number
    url: str = ""  # the API base, e.g. http://127.0.0.1:PORT/api, once started

    def put(self, *tasks: dict[str, Any]) -> None:
        for task in tasks:
            self.tasks[task["id"]] = task

    def fail(self, status: int, *, retry_after: str | None = None, times: int = 1) -> None:
        self.faults.extend(Fault(status, retry_after) for _ in range(times))

    @property
    def served(self) -> int:
        """Requests answered with tasks (authorized, no fault)."""
        return sum(1 for r in self.requests if r.get("_answer") == "200")

    # ------------------------------------------------------------------ the API

    async def handle(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.requests.append(query)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            query["_answer"] = "401"
            return web.json_response({"errors": ["Unauthorized"]}, status=401)
        if self.faults:
            fault = self.faults.pop(0)
            query["_answer"] = str(fault.status)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.json_response(
                {"errors": [f"fault {fault.status}"]}, status=fault.status, headers=headers
            )
        query["_answer"] = "200"
        if self.before_page is not None:
            self.before_page(len(self.requests))
        try:
            rows = self._select(query)
        except ValueError as exc:
            return web.json_response({"errors": [str(exc)]}, status=422)
        limit = min(int(query.get("limit", "20")), self.max_limit)
        offset = _offset(query.get("cursor"))
        page = rows[offset : offset + limit]
        headers = {}
        if len(page) == limit:
            base = URL(self.link_base) if self.link_base else request.url
            nxt = base.with_path(request.path).with_query(
                {**{k: v for k, v in request.query.items()}, "cursor": _cursor(offset + limit)}
            )
            headers["Link"] = f'<{nxt}>; rel="next"'
        if query.get("count") == "1":
            headers["X-Total-Count"] = str(len(rows))
        return web.Response(
            body=orjson.dumps(page), content_type="application/json", headers=headers
        )

    def _select(self, query: dict[str, str]) -> list[dict[str, Any]]:
        rows = list(self.tasks.values())
        for flt in orjson.loads(query.get("filters", "[]")):
            name, value = flt["id"], flt["value"]
            if name not in FIELDS:
                raise ValueError(f"unknown filter field {name}")
            if isinstance(value, dict):
                rows = [
                    r
                    for r in rows
                    if all(_compare(_get(r, name), op, v) for op, v in value.items())
                ]
            else:
                # Equality as Studio's SQL has it: the JSON text against the value.
                rows = [r for r in rows if str(_get(r, name)) == value]
        order = query.get("order", DEFAULT_ORDER) if self.honour_order else DEFAULT_ORDER
        for part in reversed(order.split(",")):
            name, _, descending = part.partition("-")
            if name not in FIELDS:
                raise ValueError(f"unknown order field {name}")
            rows.sort(key=functools.partial(_sort_key, name), reverse=descending == "true")
        return rows


def _get(task: dict[str, Any], name: str) -> Any:
    if name == "updatedAt":
        return task.get("status", {}).get("updatedAt")
    return task.get(name)


def _sort_key(name: str, task: dict[str, Any]) -> tuple[int, Any]:
    value = _get(task, name)
    return (0, value) if isinstance(value, int | float) else (1, str(value))


def _compare(left: Any, op: str, right: Any) -> bool:
    if left is None:
        return False
    if op == "gt":
        return bool(left > right)
    if op == "gte":
        return bool(left >= right)
    if op == "lt":
        return bool(left < right)
    if op == "lte":
        return bool(left <= right)
    raise ValueError(f"unknown filter operator {op}")


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"skip{offset}".encode()).decode()


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    return int(base64.urlsafe_b64decode(cursor.encode()).decode().removeprefix("skip"))


@asynccontextmanager
async def running(standin: StudioStandin) -> AsyncIterator[StudioStandin]:
    """Serve ``standin`` on a free port of 127.0.0.1 until the block ends."""
    app = web.Application()
    app.router.add_get("/api/task", standin.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    standin.url = f"http://{host}:{port}/api"
    try:
        yield standin
    finally:
        await runner.cleanup()


def task(task_id: str, phase: str, updated_at: int, **fields: Any) -> dict[str, Any]:
    """A Task as Studio's list returns it."""
    return {
        "id": task_id,
        "type": "upload",
        "createdAt": 1,
        "inputAssetId": f"asset-{task_id}",
        **fields,
        "status": {"phase": phase, "updatedAt": updated_at},
    }
