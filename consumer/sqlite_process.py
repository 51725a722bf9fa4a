"""SQLite with ingestion in a child process: the same store, both cores.

CPython runs one thread of Python at a time. With the embedded store, the event loop
(HTTP, signatures) and the SQLite writer (decoding, fold, encoding, SQL) share that one
interpreter lock, so a 2-core machine works like a 1-core one. Here :meth:`ingest_raw`
runs in a child process that owns a writer connection to the same database file: it
decodes the raw messages (the wire format is the only interface; the parent never
parses them), folds them and commits, in parallel with the parent's event loop.

A caller whose own process has a core to spare (the Kafka consumer) passes
``decode_here=True``: the parent then decodes and folds the batch itself and sends the
child a plan, which the child checks and writes (:mod:`consumer.sqlite_planner`).

Batches are queued to the child over a socket pair that the parent drives from its
event loop; replies come back in order. The child commits every request it finds
queued in one transaction, so callers may hand it the next batch while one commits.

Everything else (reads, delivery records, leases) stays in the parent on the ordinary
:class:`SQLiteStore`; SQLite's file lock arbitrates the two writers
(:func:`begin_immediate`). If the child dies, the batches in flight fail (the caller
answers 503 or retries) and a new child is started.

Semantics are the store's own: the child runs the same ``_ingest_in_tx``, and a plan is
written only when it is what ``_ingest_in_tx`` would have written.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import pickle
import socket
import sqlite3
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from consumer.codec import Event
from consumer.collector import tune_for_batches
from consumer.sqlite_planner import Loaded, Planner, write_planned
from consumer.sqlite_store import SQLiteStore, Synchronous, begin_immediate, read_for_planning
from consumer.store import (
    ChangeRecord,
    IngestResult,
    Outcome,
    RawIngestResult,
    Rejected,
    decode_all,
    with_rejections,
)

__all__ = ["SQLiteProcessStore"]


def _child(conn: Connection, path: str, synchronous: Synchronous, record_updates: bool) -> None:
    tune_for_batches()
    store = SQLiteStore(path, synchronous=synchronous, record_updates=record_updates)
    sock = socket.socket(fileno=conn.fileno())  # a view of the same socket, to size it
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    sock.detach()
    con = store._connect(True)
    stopping = False
    while not stopping:
        try:
            requests = [conn.recv()]
            # Group commit across requests: whatever else is already queued shares the
            # transaction (one WAL write of the tail pages, one fsync).
            while len(requests) < _MAX_COALESCED and conn.poll(0):
                requests.append(conn.recv())
        except EOFError:
            break
        if None in requests:
            stopping = True
            requests = requests[: requests.index(None)]
        for reply in _commit(store, con, requests):
            conn.send(reply)
    con.close()


_MAX_COALESCED = 16


def _commit(
    store: SQLiteStore, con: sqlite3.Connection, requests: list[Any]
) -> list[tuple[Any, ...]]:
    """Run the requests in one transaction and answer each; if that fails, run them one
    by one so that a request the store cannot take does not fail its neighbours."""
    if not requests:
        return []
    try:
        begin_immediate(con)
        try:
            replies = [_ingest(store, con, request) for request in requests]
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    except Exception as exc:
        if len(requests) > 1:
            return [reply for request in requests for reply in _commit(store, con, [request])]
        # Reported to the parent, which raises it to the caller.
        return [("error", f"{type(exc).__name__}: {exc}", None)]
    return replies


def _ingest(store: SQLiteStore, con: sqlite3.Connection, request: Any) -> tuple[Any, ...]:
    raws, source, received_at, record_changes, planned = request
    if planned is not None:
        base = write_planned(con, planned, source, received_at)
        if base is not None:
            return ("planned", base, None)
        # What the plan assumed no longer holds: fold the batch here, as without one.
    events, rejected = decode_all(raws)
    result = store._ingest_in_tx(con, events, source, received_at, record_changes)
    outcomes = with_rejections(result, rejected, len(raws)).outcomes
    return (
        "ok",
        [o.value if isinstance(o, Outcome) else (o.reason, o.message) for o in outcomes],
        [_change_tuple(c) for c in result.changes],
    )


def _change_tuple(c: ChangeRecord) -> tuple[Any, ...]:
    return (
        c.seq,
        c.task_id,
        c.event_id,
        c.previous_phase,
        c.phase,
        c.changed_at,
        c.recorded_at,
        c.task,
        c.kind,
    )


class _WriterDied(Exception):
    pass


@dataclass(eq=False)
class _Link:
    """One writer process and the parent's end of its socket."""

    proc: Any
    conn: Connection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # Replies come back in request order; a caller may send its batch while the one
    # before is still being written, so the writer never waits for the parent's turn.
    pending: deque[asyncio.Future[Any]] = field(default_factory=deque)
    replies: asyncio.Task[None] | None = None


class SQLiteProcessStore(SQLiteStore):
    """:class:`SQLiteStore` whose ``ingest`` runs in a child process."""

    def __init__(
        self, path: Path | str, *, synchronous: Synchronous = "FULL", record_updates: bool = False
    ) -> None:
        super().__init__(path, synchronous=synchronous, record_updates=record_updates)
        self._link: _Link | None = None
        self._restarting = asyncio.Lock()
        self._planning = asyncio.Lock()
        self._planner = Planner(self._load_for_planning, record_updates=record_updates)

    @property
    def _proc(self) -> Any:
        return None if self._link is None else self._link.proc

    async def open(self) -> None:
        await super().open()  # creates the schema before the child connects
        self._link = await self._spawn()

    async def _spawn(self) -> _Link:
        # spawn, not fork: the parent has threads and an event loop running.
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()  # a Unix socket pair
        proc = ctx.Process(
            target=_child,
            args=(child, str(self.path), self._synchronous, self.record_updates),
            name="phasewatch-sqlite-writer",
            daemon=True,
        )
        proc.start()
        child.close()
        # The parent talks to the child from the event loop itself, not from a helper
        # thread: a thread blocked on a full socket buffer needs the interpreter lock back
        # after every chunk, and waits a whole switch interval (5 ms) each time the loop
        # is busy; a batch of a few MB took 100+ ms that way.
        sock = socket.socket(fileno=os.dup(parent.fileno()))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_SOCKET_BUFFER)
        link = _Link(proc, parent, reader, writer)
        link.replies = asyncio.create_task(_read_replies(link), name="sqlite-writer-replies")
        return link

    async def _stop(self, link: _Link, *, graceful: bool) -> None:
        if graceful:
            with contextlib.suppress(OSError):
                link.writer.write(_frame(pickle.dumps(None)))
                await link.writer.drain()
        else:
            link.proc.kill()
        if link.replies is not None:
            with contextlib.suppress(Exception):
                await link.replies  # ends at the child's EOF
        link.writer.close()
        with contextlib.suppress(OSError):
            await link.writer.wait_closed()
        link.conn.close()
        await asyncio.get_running_loop().run_in_executor(None, link.proc.join, 10)

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await self._stop(link, graceful=True)
        await super().close()

    async def ingest(
        self,
        events: Sequence[Event],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
    ) -> IngestResult:
        # The child decodes the raw bytes again: cheaper than pickling the parsed events.
        raws = [e.raw for e in events]
        result = await self.ingest_raw(raws, source, received_at, record_changes=record_changes)
        outcomes = [o for o in result.outcomes if isinstance(o, Outcome)]
        if len(outcomes) != len(raws):
            raise RuntimeError("the writer process rejected an event that decoded here")
        return IngestResult(outcomes, result.changes)

    async def ingest_raw(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        *,
        record_changes: bool = True,
        decode_here: bool = False,
    ) -> RawIngestResult:
        """Batches from concurrent callers are queued to the writer, which commits them
        one after another, in the order they were sent. With ``decode_here``, this
        process decodes and folds the batch and the writer only writes it (see
        :mod:`consumer.sqlite_planner`)."""
        link = self._link
        if link is None:
            raise RuntimeError("SQLiteProcessStore is not open")
        if not decode_here:
            status, outcomes, changes = await self._call(
                link, (list(raws), source, received_at, record_changes, None)
            )
            return _result(outcomes, changes)
        async with self._planning:
            # Plans go to the writer in the order they are made: each builds on the last.
            plan = await self._planner.plan(raws, record_changes)
            reply = self._send(
                link, (list(raws), source, received_at, record_changes, plan.planned)
            )
        try:
            status, outcomes, changes = await self._answer(link, reply)
        except BaseException:
            self._planner.settle(plan, used=False)
            raise
        self._planner.settle(plan, used=status == "planned")
        if status != "planned":
            refolded = _result(outcomes, changes)
            return RawIngestResult(refolded.outcomes, refolded.changes, refolded=True)
        base: int = outcomes
        return RawIngestResult(
            plan.outcomes,
            [c.recorded(seq, received_at) for seq, c in enumerate(plan.changes, start=base + 1)],
        )

    async def _call(self, link: _Link, request: tuple[Any, ...]) -> tuple[Any, ...]:
        return await self._answer(link, self._send(link, request))

    def _send(self, link: _Link, request: tuple[Any, ...]) -> asyncio.Future[Any]:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending.append(reply)
        # One write() per frame: frames of concurrent callers never interleave.
        link.writer.write(_frame(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)))
        return reply

    async def _answer(self, link: _Link, reply: asyncio.Future[Any]) -> tuple[Any, ...]:
        try:
            await link.writer.drain()
            answer: tuple[Any, ...] = await reply
        except (OSError, _WriterDied):
            # The writer died (killed, out of memory). Start another; this batch fails
            # (503: the sender retries, and a batch it did commit comes back a duplicate).
            reply.cancel()
            await self._restart(link)
            raise RuntimeError("SQLite writer process died; a new one was started") from None
        if answer[0] == "error":
            raise RuntimeError(f"SQLite writer process failed: {answer[1]}")
        return answer

    async def _load_for_planning(self, task_ids: list[str], untasked: list[str]) -> Loaded:
        def run() -> Loaded:
            return Loaded(*read_for_planning(self._r(), task_ids, untasked))

        return await self._run(self._reader, run)

    async def _restart(self, dead: _Link) -> None:
        async with self._restarting:
            if self._link is dead:  # not already restarted by another caller
                self._link = None
                self._planner.forget()
                await self._stop(dead, graceful=False)
                self._link = await self._spawn()


def _result(outcomes: list[Any], changes: list[Any]) -> RawIngestResult:
    return RawIngestResult(
        [Outcome(o) if isinstance(o, str) else Rejected(*o) for o in outcomes],
        [ChangeRecord(*c) for c in changes],
    )


async def _read_replies(link: _Link) -> None:
    try:
        while True:
            (size,) = _HEADER.unpack(await link.reader.readexactly(_HEADER.size))
            if size == -1:
                (size,) = _LONG.unpack(await link.reader.readexactly(_LONG.size))
            reply = pickle.loads(await link.reader.readexactly(size))  # noqa: S301 - our child
            waiter = link.pending.popleft()
            if not waiter.done():
                waiter.set_result(reply)
    except (OSError, EOFError, asyncio.IncompleteReadError):
        pass
    finally:
        while link.pending:
            waiter = link.pending.popleft()
            if not waiter.done():
                waiter.set_exception(_WriterDied())


# multiprocessing.Connection's framing, which the child reads and writes.
_HEADER = struct.Struct("!i")
_LONG = struct.Struct("!Q")
_SOCKET_BUFFER = 4 * 1024 * 1024


def _frame(payload: bytes) -> bytes:
    size = len(payload)
    if size > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG.pack(size) + payload
    return _HEADER.pack(size) + payload
