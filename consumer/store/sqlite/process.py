"""SQLite with ingestion in a child process: the same store, both cores.

CPython runs one thread of Python at a time. With the embedded store, the event loop
(HTTP, signatures) and the SQLite writer (decoding, fold, encoding, SQL) share that one
interpreter lock, so a 2-core machine works like a 1-core one. Here :meth:`ingest_raw`
runs in a child process that owns a writer connection to the same database file: it
decodes the raw messages (the wire format is the only interface; the parent never
parses them), folds them and commits, in parallel with the parent's event loop.

A caller that passes record keys (the Kafka consumer, whose own process has a core to
spare; webhooks have none and pass none) gets its batch split by key: for a share of
the keys (``fold_here``, 0.7 by default; the key is the task id, so a task is always
folded on the same side), the parent decodes and folds the records itself and sends the
child a plan, which the child checks and writes (:mod:`consumer.store.sqlite.planner`);
the child decodes and folds the rest. So such a batch is up to two transactions, each
all or nothing by task, both done before the call returns; a retry of the whole batch
finds the committed part as duplicates. Plans that went stale are counted in
``stats().backend["plans_refused"]``.

Batches are queued to the child over a socket pair that the parent drives from its
event loop; replies come back in order. The framing is this module's own (a length,
then a pickle), on both ends. The child commits every request it finds queued in one
transaction, so callers may hand it the next batch while one commits
(:attr:`pipeline_depth` is 2).

Everything else (reads, delivery records, leases) stays in the parent on the ordinary
:class:`SQLiteStore`; SQLite's file lock arbitrates the two writers
(:func:`begin_immediate`). If the child dies, the batches in flight fail (the caller
answers 503 or retries) and a new child is started.

Semantics are the store's own: the child runs the same ``ingest_in_tx``, and a plan is
written only when it is what ``ingest_in_tx`` would have written.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import pickle
import socket
import sqlite3
import struct
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from consumer.core.change import ChangeRecord
from consumer.core.codec import Event
from consumer.core.plan import Outcome
from consumer.core.receipt import Receipt
from consumer.store.base import (
    IngestResult,
    RawIngestResult,
    Rejected,
    StoreOpenError,
    StoreStats,
    decode_all,
    receipts_of,
    with_rejections,
)
from consumer.store.sqlite.collector import tune_for_batches
from consumer.store.sqlite.planner import Loaded, Planned, Planner, write_planned
from consumer.store.sqlite.rows import read_for_planning
from consumer.store.sqlite.schema import begin_immediate, rollback
from consumer.store.sqlite.store import SQLiteStore, Synchronous

__all__ = ["SQLiteProcessStore"]


class _Channel:
    """The child's end of the socket: blocking, framed as :func:`_frame` frames."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        # Read into one preallocated chunk: sock.recv(n) allocates n bytes per call, and
        # at a few MB that is an mmap and munmap for every request.
        self._chunk = bytearray(_READ_CHUNK)
        self._view = memoryview(self._chunk)

    def _next_frame(self) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(buffer)
        end = _HEADER.size + size
        if len(buffer) < end:
            return None
        payload = bytes(buffer[_HEADER.size : end])
        del buffer[:end]
        return payload

    def _read(self, *, block: bool) -> bool:
        try:
            size = self._sock.recv_into(self._chunk, 0, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not size:
            raise EOFError
        self._buffer += self._view[:size]
        return True

    def recv(self) -> Any:
        while (payload := self._next_frame()) is None:
            self._read(block=True)
        return pickle.loads(payload)  # noqa: S301 - our parent

    def poll(self) -> bool:
        """Whether a whole request is already here (without waiting for one)."""
        while (
            len(self._buffer) < _HEADER.size
            or len(self._buffer) < _HEADER.size + (_HEADER.unpack_from(self._buffer)[0])
        ):
            if not self._read(block=False):
                return False
        return True

    def send(self, reply: Any) -> None:
        self._sock.sendall(_frame(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)))


def _child(sock: socket.socket, path: str, synchronous: Synchronous, record_updates: bool) -> None:
    tune_for_batches()
    store = SQLiteStore(path, synchronous=synchronous, record_updates=record_updates)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    conn = _Channel(sock)
    con = store.writer_connection()
    # Ready: open() waits for this, so a service answers /readyz only once its writer
    # can take a batch (before, the first webhook after start waited ~0.6 s for this
    # process to finish importing).
    conn.send(_READY)
    stopping = False
    while not stopping:
        try:
            requests = [conn.recv()]
            # Group commit across requests: whatever else is already queued shares the
            # transaction (one WAL write of the tail pages, one fsync).
            while len(requests) < _MAX_COALESCED and conn.poll():
                requests.append(conn.recv())
        except EOFError:
            break
        if None in requests:
            stopping = True
            requests = requests[: requests.index(None)]
        for reply in _commit(store, con, requests):
            conn.send(reply)
    con.close()
    sock.close()


_MAX_COALESCED = 16


class _Request(NamedTuple):
    """A batch for the writer; ``planned``: the rows planned in the parent, if any;
    ``receipts``: the raws' receipts by position (see :func:`_wire`), None when none has
    one."""

    raws: list[bytes]
    source: str
    received_at: int
    record_changes: bool
    planned: Planned | None
    receipts: list[tuple[str | None, str | None] | None] | None = None


def _wire(
    receipts: Sequence[Receipt | None] | None,
) -> list[tuple[str | None, str | None] | None] | None:
    """Receipts as plain tuples for the socket (a third of the cost of pickling the
    dataclass), None when there are none to carry."""
    if receipts is None or all(r is None for r in receipts):
        return None
    return [None if r is None else (r.secret, r.traceparent) for r in receipts]


def _unwire(
    receipts: list[tuple[str | None, str | None] | None] | None,
) -> list[Receipt | None] | None:
    if receipts is None:
        return None
    return [None if r is None else Receipt(*r) for r in receipts]


class _Reply(NamedTuple):
    """The writer's answer to one :class:`_Request`.

    ``status``: "ok" (folded here: ``outcomes`` and ``changes`` say what happened),
    "planned" (the plan was written: its changes' seqs follow ``base``) or "error"."""

    status: str
    outcomes: Sequence[str | tuple[str, str]] = ()  # an Outcome's value, or a Rejected's
    # Each ChangeRecord as the tuple of its fields, in order: a third of the cost of
    # pickling the dataclass, paid per change in the serving process.
    changes: Sequence[tuple[Any, ...]] = ()
    base: int = 0
    error: str | None = None


def _commit(store: SQLiteStore, con: sqlite3.Connection, requests: list[_Request]) -> list[_Reply]:
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
            rollback(con)
            raise
    except Exception as exc:
        if len(requests) > 1:
            return [reply for request in requests for reply in _commit(store, con, [request])]
        # Reported to the parent, which raises it to the caller.
        return [_Reply("error", error=f"{type(exc).__name__}: {exc}")]
    return replies


def _ingest(store: SQLiteStore, con: sqlite3.Connection, request: _Request) -> _Reply:
    if request.planned is not None:
        base = write_planned(con, request.planned, request.source, request.received_at)
        if base is not None:
            return _Reply("planned", base=base)
        # What the plan assumed no longer holds: fold the batch here, as without one.
    events, rejected = decode_all(request.raws, _unwire(request.receipts))
    result = store.ingest_in_tx(
        con, events, request.source, request.received_at, request.record_changes
    )
    outcomes = with_rejections(result, rejected, len(request.raws)).outcomes
    return _Reply(
        "ok",
        [o.value if isinstance(o, Outcome) else (o.reason, o.message) for o in outcomes],
        [_fields(c) for c in result.changes],
    )


def _fields(c: ChangeRecord) -> tuple[Any, ...]:
    """``c``'s fields in declaration order: ``ChangeRecord(*fields)`` builds it again."""
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
        c.traceparent,
    )


class _WriterDied(Exception):
    pass


@dataclass(eq=False)
class _Link:
    """One writer process and the parent's end of its socket."""

    proc: Any
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # Replies come back in request order; a caller may send its batch while the one
    # before is still being written, so the writer never waits for the parent's turn.
    pending: deque[asyncio.Future[Any]] = field(default_factory=deque)
    replies: asyncio.Task[None] | None = None


class SQLiteProcessStore(SQLiteStore):
    """:class:`SQLiteStore` whose ``ingest`` runs in a child process."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: Synchronous = "FULL",
        record_updates: bool = False,
        fold_here: float = 0.7,
        migrate: bool = True,
    ) -> None:
        # open() migrates (or refuses) in this process before the writer process
        # connects, so the writer finds nothing pending.
        super().__init__(
            path, synchronous=synchronous, record_updates=record_updates, migrate=migrate
        )
        if not 0 <= fold_here <= 1:
            raise ValueError(f"fold_here must be within 0..1, got {fold_here}")
        self._fold_here = round(fold_here * 1000)  # per mille of the keys
        self._link: _Link | None = None
        self._opened = False  # between open() and close(): a lost writer is replaced
        self._restarting = asyncio.Lock()
        self._planning = asyncio.Lock()
        self._planner = Planner(self._load_for_planning, record_updates=record_updates)

    @property
    def pipeline_depth(self) -> int:
        return 2  # the writer commits together what it finds queued: keep it fed

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid (None while none runs), for operators and tests."""
        return None if self._link is None else int(self._link.proc.pid)

    @property
    def plans_used(self) -> int:
        """Plans made here that the writer checked and wrote."""
        return self._planner.used

    @property
    def plans_refused(self) -> int:
        """Plans made here that the writer found stale and folded again itself."""
        return self._planner.refused

    def kill_writer(self) -> None:
        """Kill the writer process, as the OOM killer would: the batches in flight fail,
        and the next call starts a new writer. For fault drills and tests."""
        if self._link is not None:
            self._link.proc.kill()
            self._link.proc.join(10)

    async def stats(self) -> StoreStats:
        stats = await super().stats()
        return replace(stats, backend={**stats.backend, "plans_refused": self.plans_refused})

    async def open(self) -> None:
        await super().open()  # creates the schema before the child connects
        try:
            self._link = await self._spawn()
        except _WriterDied as exc:
            await super().close()
            raise StoreOpenError(f"{self.path}: {exc}") from exc
        self._opened = True

    async def _spawn(self) -> _Link:
        # spawn, not fork: the parent has threads and an event loop running.
        ctx = mp.get_context("spawn")
        parent, child = socket.socketpair()
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
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=_SOCKET_BUFFER)
        link = _Link(proc, reader, writer)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                hello = await _read_frame(reader)
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
            proc.kill()
            writer.close()
            raise _WriterDied(f"the SQLite writer process did not start: {exc!r}") from exc
        if hello != _READY:
            proc.kill()
            writer.close()
            raise _WriterDied(f"the SQLite writer process said {hello!r} instead of ready")
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
        await asyncio.get_running_loop().run_in_executor(None, link.proc.join, 10)

    async def close(self) -> None:
        link, self._link = self._link, None
        self._opened = False
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
        result = await self.ingest_raw(
            raws,
            source,
            received_at,
            record_changes=record_changes,
            receipts=receipts_of(events),
        )
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
        keys: Sequence[bytes | None] | None = None,
        receipts: Sequence[Receipt | None] | None = None,
    ) -> RawIngestResult:
        """Batches from concurrent callers are queued to the writer, which commits them
        one after another, in the order they were sent. With ``keys``, the records of a
        ``fold_here`` share of the keys are decoded and folded here and the writer only
        writes them (see the module docstring). ``receipts`` go with their raws, by
        position, whichever side folds them."""
        if receipts is not None and len(receipts) != len(raws):
            raise ValueError(f"{len(receipts)} receipts for {len(raws)} messages")
        if keys is None or self._fold_here == 0:
            return await self._ingest_there(raws, source, received_at, record_changes, receipts)
        here: list[int] = []
        there: list[int] = []
        for i, key in enumerate(keys):
            fold_here = key is not None and zlib.crc32(key) % 1000 < self._fold_here
            (here if fold_here else there).append(i)
        parts = [
            (positions, self._ingest_here if local else self._ingest_there)
            for positions, local in ((here, True), (there, False))
            if positions
        ]
        results = await asyncio.gather(
            *(
                ingest(
                    [raws[i] for i in positions],
                    source,
                    received_at,
                    record_changes,
                    None if receipts is None else [receipts[i] for i in positions],
                )
                for positions, ingest in parts
            )
        )
        if len(results) == 1:
            return results[0]
        outcomes: list[Outcome | Rejected] = [Outcome.DUPLICATE] * len(raws)
        changes: list[ChangeRecord] = []
        for (positions, _), result in zip(parts, results, strict=True):
            for i, outcome in zip(positions, result.outcomes, strict=True):
                outcomes[i] = outcome
            changes.extend(result.changes)
        changes.sort(key=lambda c: c.seq)
        return RawIngestResult(outcomes, changes)

    async def _ingest_there(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        record_changes: bool,
        receipts: Sequence[Receipt | None] | None = None,
    ) -> RawIngestResult:
        """The writer process decodes, folds and writes."""
        link = await self._current_link()
        reply = await self._call(
            link,
            _Request(list(raws), source, received_at, record_changes, None, _wire(receipts)),
        )
        return _result(reply)

    async def _ingest_here(
        self,
        raws: Sequence[bytes],
        source: str,
        received_at: int,
        record_changes: bool,
        receipts: Sequence[Receipt | None] | None = None,
    ) -> RawIngestResult:
        """This process decodes and folds; the writer checks the plan and writes it."""
        link = await self._current_link()
        # This process now decodes batches too: the collector settings that suit that.
        tune_for_batches()
        async with self._planning:
            # Plans go to the writer in the order they are made: each builds on the last.
            plan = await self._planner.plan(raws, record_changes, receipts)
            # The receipts go too: if the plan went stale, the writer folds the raws itself.
            request = _Request(
                list(raws), source, received_at, record_changes, plan.planned, _wire(receipts)
            )
            waiter = self._send(link, request)
        try:
            reply = await self._answer(link, waiter)
        except BaseException:
            self._planner.settle(plan, used=False)
            raise
        self._planner.settle(plan, used=reply.status == "planned")
        if reply.status != "planned":
            return _result(reply)  # stale: the writer folded it itself
        start = reply.base + 1
        return RawIngestResult(
            plan.outcomes,
            [c.recorded(seq, received_at) for seq, c in enumerate(plan.changes, start=start)],
        )

    async def _call(self, link: _Link, request: _Request) -> _Reply:
        return await self._answer(link, self._send(link, request))

    def _send(self, link: _Link, request: _Request) -> asyncio.Future[Any]:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending.append(reply)
        # One write() per frame: frames of concurrent callers never interleave.
        link.writer.write(_frame(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)))
        return reply

    async def _answer(self, link: _Link, reply: asyncio.Future[Any]) -> _Reply:
        try:
            await link.writer.drain()
            answer: _Reply = await reply
        except (OSError, _WriterDied):
            # The writer died (killed, out of memory). Start another; this batch fails
            # (503: the sender retries, and a batch it did commit comes back a duplicate).
            reply.cancel()
            try:
                await self._restart(link)
            except _WriterDied as exc:
                # The next batch tries again (_current_link): this one fails either way.
                raise RuntimeError(f"SQLite writer process died, and {exc}") from None
            raise RuntimeError("SQLite writer process died; a new one was started") from None
        if answer.status == "error":
            raise RuntimeError(f"SQLite writer process failed: {answer.error}")
        return answer

    async def _load_for_planning(self, task_ids: list[str], untasked: list[str]) -> Loaded:
        def run() -> Loaded:
            return Loaded(*read_for_planning(self._r(), task_ids, untasked))

        return await self._run(self._reader, run)

    async def _current_link(self) -> _Link:
        link = self._link
        if link is not None:
            return link
        if not self._opened:
            raise RuntimeError("SQLiteProcessStore is not open")
        # A restart after a death failed (the new writer did not come up): try again,
        # one caller at a time, rather than refusing every batch from then on.
        async with self._restarting:
            if self._link is None:
                self._link = await self._spawn()
            return self._link

    async def _restart(self, dead: _Link) -> None:
        async with self._restarting:
            if self._link is dead:  # not already restarted by another caller
                self._link = None
                self._planner.forget()
                await self._stop(dead, graceful=False)
                self._link = await self._spawn()


def _result(reply: _Reply) -> RawIngestResult:
    return RawIngestResult(
        [Outcome(o) if isinstance(o, str) else Rejected(*o) for o in reply.outcomes],
        [ChangeRecord(*fields) for fields in reply.changes],
    )


async def _read_replies(link: _Link) -> None:
    try:
        while True:
            reply = await _read_frame(link.reader)
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


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))  # noqa: S301 - our child


# The writer's first message, once its connection is open.
_READY = "ready"
# A writer that has not said so by then is broken (an import error, a stuck disk).
_START_TIMEOUT_S = 60.0

# This module's framing, both ways: an 8-byte length, then the pickled message.
_HEADER = struct.Struct("!Q")
_SOCKET_BUFFER = 4 * 1024 * 1024
_READ_CHUNK = 256 * 1024


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload
