"""The dashboard: ``GET /``, its assets, and the figures only it needs.

The page (``consumer/api/static``: plain ES modules and CSS, no build step) reads the
API as any client would: ``/tasks*`` (redacted), ``/changes/stream`` (live changes),
``/readyz`` (handlers, Kafka lag), ``/dead-letters`` and their retry/drop routes. It
holds no data of its own, so the page and its assets are served without credentials;
with ``PHASEWATCH_API_TOKEN`` set, the script asks for the token and sends it on every
API call. Everything the page draws from the API is set as text (``textContent``), and
a strict Content-Security-Policy (no inline script or style, same-origin only) backs
that up.

Two figures exist nowhere else, so this module keeps them:

- ``GET /dashboard/series``: events/s and changes/s over the last hour, one point per
  10 s, from a ring buffer that a sampler fills from the store's counters, and each
  handler's delivery latency (commit to the handler's return), measured on a sample of
  recent changes by reading their delivery records back;
- ``GET /dashboard/phases``: how many tasks are in each phase (counted from the view,
  up to a cap, cached for a moment).

The sampler is this module's: :func:`setup` registers it on the application's startup
and cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from consumer.api.context import STATUS_KEY, STORE_KEY, ApiStore, StatusFn
from consumer.api.responses import error, json_response
from consumer.core.model import Phase, TaskType
from consumer.store.base import DeliveryStatus, TaskQuery

__all__ = [
    "ASSETS",
    "CSP",
    "INTERVAL_S",
    "OPEN_PATHS",
    "IngestSeries",
    "LatencyProbe",
    "Sampler",
    "setup",
]

log = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# name -> content type: the only files served (no path from a request reaches the disk).
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_INDEX = "index.html"
# The page and its assets carry no data: they are served without the API token.
OPEN_PATHS = frozenset(
    {"/", "/favicon.ico", "/favicon.svg", "/dashboard/config"} | {f"/static/{n}" for n in ASSETS}
)

INTERVAL_S = 10  # one point per 10 s ...
WINDOW_S = 3600  # ... over the last hour
_PROBES_PER_TICK = 16  # recent changes whose delivery latency is measured, per tick
_PROBES_MAX = 512  # per handler: changes a handler filters out never get a record
_PROBE_MAX_AGE_MS = WINDOW_S * 1000
_LATENCY_WINDOW_MS = 600_000  # latency figures cover the last 10 minutes
_PHASE_CAP = 10_000  # tasks counted per phase; beyond, the count says "at least"
_PHASE_PAGE = 1000
_PHASES_CACHE_S = 2.0


# ---------------------------------------------------------------- assets


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str


def _load(name: str, content_type: str) -> _Asset:
    body = resources.files("consumer.api").joinpath("static", name).read_bytes()
    return _Asset(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


_CACHE: dict[str, _Asset] = {}


def _asset(name: str) -> _Asset:
    # Read once per process, on first use (the package data does not change under us).
    asset = _CACHE.get(name)
    if asset is None:
        content_type = "text/html; charset=utf-8" if name == _INDEX else ASSETS[name]
        asset = _CACHE[name] = _load(name, content_type)
    return asset


def _serve(request: web.Request, name: str) -> web.Response:
    asset = _asset(name)
    headers = {**_SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


async def index(request: web.Request) -> web.Response:
    return _serve(request, _INDEX)


async def static_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        return _secured(error(404, "not_found", "no such asset"))
    return _serve(request, name)


async def favicon(request: web.Request) -> web.Response:
    # Browsers ask for /favicon.ico by themselves; an SVG answers that too.
    return _serve(request, "favicon.svg")


def _secured(response: web.Response) -> web.Response:
    response.headers.update(_SECURITY_HEADERS)
    return response


# ---------------------------------------------------------------- the series


@dataclass(frozen=True, slots=True)
class Point:
    """One interval: what the counters moved by, ending at ``t_ms``."""

    t_ms: int
    seconds: float
    events: int
    changes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "t": self.t_ms,
            "seconds": self.seconds,
            "eventsPerSecond": round(self.events / self.seconds, 3),
            "changesPerSecond": round(self.changes / self.seconds, 3),
        }


class IngestSeries:
    """A ring buffer of per-interval counter deltas: the last ``window_s`` seconds.

    Fed with the counters' totals; the first reading (and any reading after a counter
    went backwards: a store replaced behind our back) only sets the baseline."""

    def __init__(self, interval_s: float = INTERVAL_S, window_s: float = WINDOW_S) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self._points: deque[Point] = deque(maxlen=max(1, math.ceil(window_s / interval_s)))
        self._last: tuple[int, int, int] | None = None  # (t_ms, events, changes)

    def observe(self, t_ms: int, events: int, changes: int) -> Point | None:
        last, self._last = self._last, (t_ms, events, changes)
        if last is None or t_ms <= last[0] or events < last[1] or changes < last[2]:
            return None
        point = Point(t_ms, (t_ms - last[0]) / 1000, events - last[1], changes - last[2])
        self._points.append(point)
        return point

    def points(self, now_ms: int) -> list[Point]:
        """The points of the last window before ``now_ms``, oldest first."""
        since = now_ms - self.window_s * 1000
        return [p for p in self._points if p.t_ms > since]


@dataclass(slots=True)
class _Probe:
    seq: int
    recorded_at: int


@dataclass(slots=True)
class _HandlerLatency:
    probes: deque[_Probe] = field(default_factory=lambda: deque(maxlen=_PROBES_MAX))
    samples: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=4096))


class LatencyProbe:
    """Each handler's delivery latency, from commit to the handler's return: a sample of
    recent changes is watched until each handler's delivery record for it is ``done``,
    whose time (taken when the handler returned) minus the change's commit time is one
    measurement. Changes a handler filters out get no record and age out."""

    def __init__(self) -> None:
        self._handlers: dict[str, _HandlerLatency] = {}

    def watch(self, handlers: Iterable[str], probes: Sequence[tuple[int, int]]) -> None:
        """Watch ``(seq, recorded_at)`` changes for these handlers (and forget handlers
        that are gone)."""
        names = set(handlers)
        for gone in set(self._handlers) - names:
            del self._handlers[gone]
        for name in names:
            state = self._handlers.setdefault(name, _HandlerLatency())
            state.probes.extend(_Probe(seq, at) for seq, at in probes)

    async def resolve(self, store: ApiStore, now_ms: int) -> None:
        for name, state in self._handlers.items():
            state.probes = deque(
                (p for p in state.probes if now_ms - p.recorded_at <= _PROBE_MAX_AGE_MS),
                maxlen=_PROBES_MAX,
            )
            if not state.probes:
                continue
            records = await store.deliveries_for(name, [p.seq for p in state.probes])
            waiting: deque[_Probe] = deque(maxlen=_PROBES_MAX)
            for probe in state.probes:
                record = records.get(probe.seq)
                if record is None or record.status in (
                    DeliveryStatus.FAILING,
                    DeliveryStatus.REDRIVE,
                ):
                    waiting.append(probe)
                elif record.status is DeliveryStatus.DONE:
                    latency = max(0, record.last_attempt_at - probe.recorded_at)
                    state.samples.append((record.last_attempt_at, latency))
                # dead or dropped: never delivered, nothing to measure
            state.probes = waiting

    def figures(self, now_ms: int) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, state in sorted(self._handlers.items()):
            recent = sorted(ms for t, ms in state.samples if now_ms - t <= _LATENCY_WINDOW_MS)
            out[name] = {
                "samples": len(recent),
                "p50Ms": _quantile(recent, 0.5),
                "p95Ms": _quantile(recent, 0.95),
                "maxMs": recent[-1] if recent else None,
                "windowSeconds": _LATENCY_WINDOW_MS // 1000,
            }
        return out


def _quantile(ordered: Sequence[int], q: float) -> int | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class Sampler:
    """Every ``interval_s`` (on the wall clock's multiples of it), read the store's
    counters into the series and measure handler latencies. A failing read (the store
    down) skips that tick; the next interval then spans both."""

    def __init__(
        self,
        store: ApiStore,
        status: StatusFn,
        *,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.status = status
        self.series = IngestSeries(interval_s)
        self.latency = LatencyProbe()
        self._clock = clock
        self._last_change_seq: int | None = None
        self._task: asyncio.Task[None] | None = None

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def tick(self) -> None:
        now = self.now_ms()
        stats = await self.store.stats()
        self.series.observe(now, stats.events, stats.last_change_seq)
        previous, self._last_change_seq = self._last_change_seq, stats.last_change_seq
        handlers = list((await self.status())["dispatch"]["handlers"])
        probes: list[tuple[int, int]] = []
        if handlers and previous is not None and stats.last_change_seq > previous:
            first = max(previous + 1, stats.last_change_seq - _PROBES_PER_TICK + 1)
            records = await self.store.changes_by_seq(range(first, stats.last_change_seq + 1))
            probes = [(c.seq, c.recorded_at) for c in records]
        self.latency.watch(handlers, probes)
        await self.latency.resolve(self.store, now)

    async def run(self) -> None:
        interval = self.series.interval_s
        while True:
            now = self._clock()
            await asyncio.sleep(interval - now % interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("dashboard sample skipped: %s", type(exc).__name__)

    def payload(self) -> dict[str, Any]:
        now = self.now_ms()
        return {
            "intervalSeconds": self.series.interval_s,
            "windowSeconds": self.series.window_s,
            "now": now,
            "points": [p.as_dict() for p in self.series.points(now)],
            "handlers": self.latency.figures(now),
        }

    async def start(self, app: web.Application) -> None:
        del app
        self._task = asyncio.create_task(self.run(), name="dashboard-sampler")

    async def stop(self, app: web.Application) -> None:
        del app
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# ---------------------------------------------------------------- phase counts


@dataclass(slots=True)
class _PhaseCounts:
    at: float = -math.inf
    payload: dict[str, Any] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


async def count_phases(store: ApiStore, cap: int = _PHASE_CAP) -> dict[str, Any]:
    """Tasks per known phase, each counted up to ``cap`` (then listed in ``capped``);
    ``other``: tasks in phases phasewatch does not know, when every count is exact."""
    stats = await store.stats()
    counts: dict[str, int] = {}
    capped: list[str] = []
    for phase in Phase:
        counted, cursor = 0, None
        while counted < cap:
            page = await store.list_tasks(
                TaskQuery(phases=(phase.value,), after=cursor, limit=min(_PHASE_PAGE, cap))
            )
            counted += len(page.tasks)
            cursor = page.next_cursor
            if cursor is None:
                break
        if cursor is not None:
            capped.append(phase.value)
        counts[phase.value] = min(counted, cap)
    other = None if capped else max(0, stats.tasks - sum(counts.values()))
    return {"total": stats.tasks, "phases": counts, "capped": capped, "other": other}


# ---------------------------------------------------------------- routes


_SAMPLER_KEY = web.AppKey("dashboard_sampler", Sampler)
_PHASES_KEY = web.AppKey("dashboard_phases", _PhaseCounts)
_TOKEN_KEY = web.AppKey("dashboard_token_required", bool)


async def series(request: web.Request) -> web.Response:
    return _secured(json_response(request.app[_SAMPLER_KEY].payload()))


async def phases(request: web.Request) -> web.Response:
    state = request.app[_PHASES_KEY]
    async with state.lock:  # one count at a time; the others get its answer
        if state.payload is None or time.monotonic() - state.at > _PHASES_CACHE_S:
            state.payload = await count_phases(request.app[STORE_KEY])
            state.at = time.monotonic()
        payload = state.payload
    return _secured(json_response(payload))


async def config(request: web.Request) -> web.Response:
    """What the page needs before its first API call: whether to ask for a token."""
    return _secured(
        json_response(
            {
                "tokenRequired": request.app[_TOKEN_KEY],
                "phases": [p.value for p in Phase],
                "types": [t.value for t in TaskType],
                "intervalSeconds": INTERVAL_S,
            }
        )
    )


Route = tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


def setup(app: web.Application, *, token_required: bool) -> None:
    """Add the dashboard's routes, and its sampler to the app's startup and cleanup.
    Needs the store and status on the app (:mod:`consumer.api.context`)."""
    sampler = Sampler(app[STORE_KEY], app[STATUS_KEY])
    app[_SAMPLER_KEY] = sampler
    app[_PHASES_KEY] = _PhaseCounts()
    app[_TOKEN_KEY] = token_required
    routes: list[Route] = [
        ("/", index),
        ("/favicon.ico", favicon),
        ("/favicon.svg", favicon),
        ("/static/{name}", static_asset),
        ("/dashboard/config", config),
        ("/dashboard/series", series),
        ("/dashboard/phases", phases),
    ]
    for path, handler in routes:
        app.router.add_get(path, handler)
    app.on_startup.append(sampler.start)
    app.on_cleanup.append(sampler.stop)
