"""The changes feed: ``GET /changes`` (pages and long-poll) and ``GET /changes/stream``
(server-sent events), for any HTTP client to follow every recorded change from a
cursor and resume after a disconnect without gaps: list the tasks, then watch.

* **Order.** Changes come in commit order, the outbox's ``seq`` order, which the store
  contract makes final: once a reader has seen ``seq = n``, every change it sees later
  has a larger seq (:meth:`~consumer.store.base.OutboxStore.changes_after`). So a
  cursor is a seq, and resuming after it misses nothing and repeats nothing.
* **Cursors** are opaque: ``pw1:<seq>`` in unpadded URL-safe base64. ``after=now``
  starts at the newest change committed. Without ``after``, the feed starts at the
  oldest change retained. A cursor below what retention kept is 410 Gone (re-list).
* **Nothing is held in memory.** A commit only bumps a generation counter
  (:class:`ChangeFeed`, fed by the ingestion sources' ``on_changes`` and, on
  PostgreSQL, by the LISTEN that fires when any replica commits); every waiter then
  re-reads the store. Readers at the same cursor share one read while it runs (100
  streams at the head of the feed cost one query per commit, not 100).
* **Slow clients are dropped**: each write must drain within ``drain_timeout_s`` and the
  connection's buffer stay under ``max_buffer_bytes``, or the stream is closed (the
  client resumes from its ``Last-Event-ID``).
* **Credentials never appear**: a change shows the listed fields only (never the task),
  strings cut by :func:`~consumer.core.secrets.redact_text` like every exit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from consumer.api.context import MAX_PAGE, STORE_KEY, ApiStore
from consumer.api.responses import error, json_response
from consumer.core.change import ChangeRecord, stale_threshold_ms
from consumer.core.secrets import redact_text

__all__ = [
    "FEED_KEY",
    "MAX_WAIT_S",
    "STREAM_PATH",
    "ChangeFeed",
    "ChangeFilter",
    "StreamConfig",
    "decode_cursor",
    "encode_cursor",
    "list_changes",
    "stream_changes",
]

log = logging.getLogger(__name__)

STREAM_PATH = "/changes/stream"
MAX_WAIT_S = 30.0
SCAN_FACTOR = 10  # a request examines at most this many rows per change it may return
STREAM_BATCH = 500  # rows a stream reads at a time
_CURSOR_PREFIX = b"pw1:"
_MAX_CURSOR_CHARS = 40
_MAX_SEQ = 2**63
_NEVER_PAUSES = 60 * 1024  # below asyncio's default high-water mark, with chunk framing
GONE_MESSAGE = (
    "the cursor is older than the oldest change retained (PHASEWATCH_CHANGES_RETENTION): "
    "changes after it were pruned. Re-list the tasks (GET /tasks), then resume from "
    "GET /changes without after"
)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(_CURSOR_PREFIX + str(seq).encode()).rstrip(b"=").decode()


def decode_cursor(text: str) -> int:
    """The seq a cursor names; ValueError for anything this API did not issue."""
    bad = ValueError("cursor is not one this API issued (use a cursor or next from this API)")
    if not 0 < len(text) <= _MAX_CURSOR_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise bad from None
    digits = raw.removeprefix(_CURSOR_PREFIX)
    if digits == raw or not digits.isdigit() or not digits.isascii():
        raise bad
    seq = int(digits)
    if seq >= _MAX_SEQ or encode_cursor(seq) != text:  # one spelling per seq
        raise bad
    return seq


@dataclass(frozen=True, slots=True)
class StreamConfig:
    heartbeat_s: float = 15.0  # a comment line this often while nothing is sent
    max_buffer_bytes: int = 1 << 20  # a connection buffering more than this is dropped
    drain_timeout_s: float = 10.0  # a write not drained in this time drops the client
    linger_s: float = 0.05  # readers are woken at most this often (commits coalesce)


@dataclass(slots=True)
class _Batch:
    """One read of the store, shared by the readers that asked for it meanwhile."""

    rows: list[ChangeRecord]
    oldest: int  # the store's oldest_change_seq, read after the rows
    _docs: dict[int, dict[str, Any]] = field(default_factory=dict)
    _events: dict[int, bytes] = field(default_factory=dict)
    _streamed: dict[ChangeFilter, bytes] = field(default_factory=dict)

    def gone(self, after: int) -> bool:
        """Whether changes past ``after`` were pruned (by the time the rows were read)."""
        return after + 1 < self.oldest

    def doc(self, i: int) -> dict[str, Any]:
        found = self._docs.get(i)
        if found is None:
            found = self._docs[i] = change_doc(self.rows[i])
        return found

    def event(self, i: int) -> bytes:
        found = self._events.get(i)
        if found is None:
            doc = self.doc(i)
            found = self._events[i] = b"id: %s\nevent: change\ndata: %s\n\n" % (
                doc["cursor"].encode(),
                orjson.dumps(doc),
            )
        return found

    def stream_bytes(self, flt: ChangeFilter) -> bytes:
        """What a stream with filter ``flt`` sends for these rows: the events it
        matches and, when rows past the last of them matched nothing, an id-only block
        (which fires no event) so that the client's Last-Event-ID moves past them and
        it never reads them again. Made once per filter: streams with the same filter
        (most, at the head of the feed) share it."""
        found = self._streamed.get(flt)
        if found is None:
            out: list[bytes] = []
            last_emitted = -1
            for i, change in enumerate(self.rows):
                if flt.matches(change):
                    out.append(self.event(i))
                    last_emitted = i
            if self.rows and last_emitted != len(self.rows) - 1:
                out.append(b"id: %s\n\n" % encode_cursor(self.rows[-1].seq).encode())
            found = self._streamed[flt] = b"".join(out)
        return found


def change_doc(c: ChangeRecord) -> dict[str, Any]:
    """A change as the feed shows it: these fields only, never the task."""
    task_type = c.task_type
    return {
        "cursor": encode_cursor(c.seq),
        "taskId": redact_text(c.task_id),
        "type": redact_text(task_type) if task_type is not None else None,
        "previousPhase": redact_text(c.previous_phase) if c.previous_phase is not None else None,
        "phase": redact_text(c.phase),
        "changedAt": c.changed_at,
        "eventId": redact_text(c.event_id),
        "kind": _public_kind(c.kind),
    }


def _public_kind(kind: str) -> str:
    """The kind as handlers see it: a stale alert's outbox kind carries its threshold
    (``stale:300000``), the feed says ``stale`` as ``PhaseChange.kind`` does."""
    return "stale" if stale_threshold_ms(kind) is not None else kind


class ChangeFeed:
    """The in-process "changes committed" broadcaster, and the feed's shared reads.

    :meth:`notify` is called (on this loop) after every commit that recorded changes,
    here or, on PostgreSQL, by any replica; it bumps :attr:`generation` and wakes the
    waiters, which then read the store. No change is kept here."""

    def __init__(self, config: StreamConfig | None = None) -> None:
        self.config = config or StreamConfig()
        self._generation = 0
        self._event = asyncio.Event()
        self._closing = False
        self._reads: dict[tuple[int, int], tuple[int, asyncio.Task[_Batch]]] = {}
        self.waiting = 0  # readers waiting for a commit now (long-polls and streams)
        self.streams = 0  # streams open now
        self.dropped = 0  # streams closed because the client did not keep up
        self.reads = 0  # store reads made (shared ones count once)
        self.notifies = 0  # commits told
        self.wakes = 0  # times the waiters were woken (commits within linger_s count once)
        self._wake_due: asyncio.TimerHandle | None = None
        self._last_wake = -math.inf
        self._ticker: asyncio.Task[None] | None = None

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def closing(self) -> bool:
        return self._closing

    def notify(self, changes: Sequence[ChangeRecord] | None = None) -> None:
        """Changes were committed: wake every waiter (they re-read the store), at once
        if the last wake is ``linger_s`` old, else when it is: under load, when commits
        come every few milliseconds, each wake (a read and a write per stream) then
        carries the commits of ``linger_s``."""
        del changes
        self.notifies += 1
        if self._wake_due is not None:
            return
        loop = asyncio.get_running_loop()
        due = self._last_wake + self.config.linger_s
        if self._closing or loop.time() >= due:
            self._wake()
        else:
            self._wake_due = loop.call_at(due, self._wake)

    def _wake(self) -> None:
        if self._wake_due is not None:
            self._wake_due.cancel()
            self._wake_due = None
        self._last_wake = asyncio.get_running_loop().time()
        self.wakes += 1
        self._generation += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    def start_ticker(self) -> None:
        """Wake every waiter every half heartbeat, commit or not, while streams are
        served: streams send their heartbeats then, and re-read the store (a commit that
        nobody told this process about is found within a heartbeat). One timer for
        all the streams, rather than one per stream per wait."""
        if self._ticker is None and not self._closing:
            self._ticker = asyncio.create_task(self._tick(), name="changes-feed-ticker")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s / 2)
            self._wake()

    async def close(self, app: web.Application | None = None) -> None:
        """The service is stopping: long-polls answer now, streams end."""
        del app
        self._closing = True
        self._wake()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def wait(self, seen: int, within_s: float | None = None) -> bool:
        """Wait until the generation moves past ``seen`` (True) or ``within_s`` passes
        (None: no limit; the ticker wakes streams)."""
        if self._generation != seen or self._closing:
            return True
        event = self._event
        self.waiting += 1
        try:
            if within_s is None:
                await event.wait()
            else:
                async with asyncio.timeout(max(within_s, 0.0)):
                    await event.wait()
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        return True

    async def read(self, store: ApiStore, after: int, limit: int, seen: int) -> _Batch:
        """``changes_after(after, limit)`` and the retention floor. A reader joins a read
        already running for the same rows only if it started after generation ``seen``
        (so it sees every commit the reader was woken for)."""
        key = (after, limit)
        running = self._reads.get(key)
        if running is None or running[0] < seen:
            task = asyncio.create_task(self._read(store, after, limit))
            self._reads[key] = (self._generation, task)
            task.add_done_callback(lambda done: self._forget(key, done))
        else:
            task = running[1]
        return await asyncio.shield(task)

    def _forget(self, key: tuple[int, int], done: asyncio.Task[_Batch]) -> None:
        running = self._reads.get(key)
        if running is not None and running[1] is done:
            del self._reads[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failure is every waiter's, logged by them

    async def _read(self, store: ApiStore, after: int, limit: int) -> _Batch:
        self.reads += 1
        rows = await store.changes_after(after, limit)
        # Read after the rows: a prune that ran before them shows here.
        return _Batch(rows, await store.oldest_change_seq())


FEED_KEY = web.AppKey("changes_feed", ChangeFeed)

_KINDS = frozenset({"phase", "update", "stale"})


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    kinds: frozenset[str] = frozenset({"phase"})  # empty: every kind
    phases: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    task_ids: frozenset[str] = frozenset()

    @property
    def everything(self) -> bool:
        return not (self.kinds or self.phases or self.types or self.task_ids)

    def matches(self, c: ChangeRecord) -> bool:
        return (
            (not self.kinds or _public_kind(c.kind) in self.kinds)
            and (not self.phases or c.phase in self.phases)
            and (not self.types or c.task_type in self.types)
            and (not self.task_ids or c.task_id in self.task_ids)
        )


After = int | Literal["now"] | None


@dataclass(frozen=True, slots=True)
class _Query:
    after: After
    filter: ChangeFilter
    limit: int = 100
    wait_s: float = 0.0


_FILTER_PARAMS = frozenset({"after", "kind", "phase", "type", "taskId"})
_LIST_PARAMS = _FILTER_PARAMS | {"limit", "wait"}
_STREAM_PARAMS = _FILTER_PARAMS | {"token"}


def _split(values: Sequence[str]) -> frozenset[str]:
    return frozenset(p for v in values for p in v.split(",") if p)


def _parse_after(text: str | None) -> After:
    if text is None:
        return None
    if text == "now":
        return "now"
    return decode_cursor(text)


def _query(request: web.Request, known: frozenset[str]) -> _Query:
    q = request.query
    if set(q) - known:
        # Not echoed: names come from the request. The known ones say what is wrong.
        raise ValueError(f"unknown query parameter; known: {', '.join(sorted(known))}")
    kinds = _split(q.getall("kind", []))
    if "all" in kinds:
        kinds = frozenset()
    elif not kinds:
        kinds = frozenset({"phase"})
    elif kinds - _KINDS:
        raise ValueError(
            "kind must be phase, update, stale, a comma-separated list of them, or all"
        )
    flt = ChangeFilter(
        kinds=kinds,
        phases=_split(q.getall("phase", [])),
        types=_split(q.getall("type", [])),
        task_ids=frozenset(v for v in q.getall("taskId", []) if v),
    )
    limit, wait_s = 100, 0.0
    if "limit" in q:
        try:
            limit = int(q["limit"][:20])
        except ValueError:
            raise ValueError("limit must be an integer") from None
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    if "wait" in q:
        try:
            wait_s = float(q["wait"][:20])
        except ValueError:
            raise ValueError("wait must be a number of seconds") from None
        if not (math.isfinite(wait_s) and 0 <= wait_s <= MAX_WAIT_S):
            raise ValueError(f"wait must be between 0 and {MAX_WAIT_S:g} seconds")
    return _Query(_parse_after(q.get("after")), flt, limit, wait_s)


async def _start(store: ApiStore, after: After) -> int:
    """The seq a reader starts after."""
    if after == "now":
        return (await store.stats()).last_change_seq
    if after is None:
        return max(0, await store.oldest_change_seq() - 1)
    return after


# How often a reader without a cursor starts again from the oldest retained change
# when retention prunes past it while it reads.
_RESTARTS = 5


def _gone() -> web.Response:
    return error(410, "gone", GONE_MESSAGE)


async def list_changes(request: web.Request) -> web.Response:
    """``GET /changes``: a page of changes after the cursor, waiting up to ``wait`` s for
    one to commit when there is none. ``next`` moves past every row examined, matched
    or not, so a rare filter does not examine the same rows again."""
    try:
        query = _query(request, _LIST_PARAMS)
    except ValueError as exc:
        return error(400, "bad_query", str(exc))
    store, feed = request.app[STORE_KEY], request.app[FEED_KEY]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + query.wait_s
    pos = await _start(store, query.after)
    restarts = 0
    while True:
        seen = feed.generation
        found, pos, status = await _scan(feed, store, pos, query)
        if status == "gone":
            # A reader that gave no cursor asked for the oldest retained change: if
            # retention pruned past it meanwhile, the new oldest is still the answer.
            if query.after is None and restarts < _RESTARTS:
                restarts += 1
                pos = await _start(store, None)
                continue
            return _gone()
        remaining = deadline - loop.time()
        if found or status == "more" or remaining <= 0 or feed.closing:
            return json_response({"changes": found, "next": encode_cursor(pos)})
        await feed.wait(seen, remaining)


async def _scan(
    feed: ChangeFeed, store: ApiStore, pos: int, query: _Query
) -> tuple[list[dict[str, Any]], int, Literal["end", "more", "gone"]]:
    """Up to ``limit`` matching changes past ``pos``, examining at most SCAN_FACTOR times
    that many rows; the position reached, and whether the outbox ended there."""
    found: list[dict[str, Any]] = []
    budget = SCAN_FACTOR * query.limit
    chunk = query.limit if query.filter.everything else min(budget, max(query.limit, 100))
    scanned = 0
    while scanned < budget:
        want = min(chunk, budget - scanned)
        batch = await feed.read(store, pos, want, feed.generation)
        if batch.gone(pos):
            return [], pos, "gone"
        for i, change in enumerate(batch.rows):
            pos = change.seq
            if query.filter.matches(change):
                found.append(batch.doc(i))
                if len(found) == query.limit:
                    return found, pos, "more"
        scanned += len(batch.rows)
        if len(batch.rows) < want:
            return found, pos, "end"
    return found, pos, "more"


async def stream_changes(request: web.Request) -> web.StreamResponse:
    """``GET /changes/stream``: every change after the cursor (``Last-Event-ID``, else
    ``after``) as an event, then each as it commits, with a heartbeat comment while
    idle. Ends when the client leaves or falls behind, or the service stops."""
    try:
        query = _query(request, _STREAM_PARAMS)
        last_id = request.headers.get("Last-Event-ID", "").strip()
        after = decode_cursor(last_id) if last_id else query.after
    except ValueError as exc:
        return error(400, "bad_query", str(exc))
    store, feed = request.app[STORE_KEY], request.app[FEED_KEY]
    pos = await _start(store, after)
    seen = feed.generation
    batch = await feed.read(store, pos, STREAM_BATCH, seen)
    for _ in range(_RESTARTS):  # no cursor given: the oldest retained, as in list_changes
        if after is not None or not batch.gone(pos):
            break
        pos = await _start(store, None)
        batch = await feed.read(store, pos, STREAM_BATCH, seen)
    if batch.gone(pos):
        return _gone()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies: pass events on as they come
        }
    )
    await response.prepare(request)
    feed.start_ticker()
    stream = _Stream(request, response, feed, store, query.filter)
    feed.streams += 1
    try:
        if await stream.run(pos, seen, batch):
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
    except Exception:
        log.exception("changes stream failed; closing it")
        _abort(request)
    finally:
        feed.streams -= 1
    return response


@dataclass(slots=True)
class _Stream:
    request: web.Request
    response: web.StreamResponse
    feed: ChangeFeed
    store: ApiStore
    filter: ChangeFilter
    last_write: float = 0.0

    async def run(self, pos: int, seen: int, batch: _Batch) -> bool:
        """Send ``batch``, then every later change; True when the stream ends cleanly
        (the service stops), False when the client is gone or dropped."""
        feed, loop = self.feed, asyncio.get_running_loop()
        heartbeat_s = feed.config.heartbeat_s
        # Headers and a first line at once: the client knows the stream is open.
        if not await self.send(b": connected\n\n"):
            return False
        while not feed.closing:
            if not await self.send(batch.stream_bytes(self.filter)):
                return False
            if batch.rows:
                pos = batch.rows[-1].seq
            if len(batch.rows) < STREAM_BATCH:  # caught up: wait for a commit (or a tick)
                await feed.wait(seen)
                if feed.closing:
                    break
                idle = loop.time() - self.last_write >= heartbeat_s
                if idle and not await self.send(b": keep-alive\n\n"):
                    return False
            # Read again, woken or not: a commit nobody told us about is found too.
            seen = feed.generation
            batch = await feed.read(self.store, pos, STREAM_BATCH, seen)
            if batch.gone(pos):
                gone = orjson.dumps({"error": "gone", "message": GONE_MESSAGE})
                await self.send(b"event: gone\ndata: %s\n\n" % gone)
                return False
        return True

    async def send(self, data: bytes) -> bool:
        """Write ``data`` (nothing to write: True); False when the stream is over: the
        client left, or it is too slow (its connection buffers too much, or a write does
        not drain in time) and is dropped."""
        if not data:
            return True
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return False
        config = self.feed.config
        buffered = transport.get_write_buffer_size()
        if buffered > config.max_buffer_bytes:
            return _drop(self.request, self.feed)
        try:
            if buffered == 0 and len(data) < _NEVER_PAUSES:
                # Nothing buffered: the transport is not paused, and this write cannot
                # pause it (asyncio pauses above 64 KiB), so it cannot wait on a drain.
                await self.response.write(data)
            else:
                async with asyncio.timeout(config.drain_timeout_s):
                    await self.response.write(data)
        except TimeoutError:
            return _drop(self.request, self.feed)
        except ConnectionError:
            return False
        self.last_write = asyncio.get_running_loop().time()
        return True


def _drop(request: web.Request, feed: ChangeFeed) -> bool:
    feed.dropped += 1
    log.warning(
        "changes stream: client %s does not keep up; dropped (it resumes from its Last-Event-ID)",
        request.remote,
    )
    _abort(request)
    return False


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()  # what it buffered is discarded, not sent
