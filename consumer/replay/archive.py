"""Archives: history moved between stores as JSONL files of raw deliveries.

The format is the fixtures' (spec §6): one ``{"signature": <Livepeer-Signature value>,
"body": <raw body as a string>}`` per line. :func:`import_archive` decodes each body and
folds it into a store in batches (source ``"import"``); :func:`export_archive` writes a
store's history back out, each body exactly as it was received. Importing an export gives
the same store contents, and importing twice changes nothing: the store deduplicates by
event id and the fold is idempotent.

Import is restartable: after each committed batch (at most once a second, and always when
stopped) the number of lines done is saved in the store's meta table under a key derived
from the file's absolute path, size and mtime; a re-run skips those lines, and the note is
deleted once the whole file is in. The checkpoint is only ever behind what is committed,
never ahead, and redoing a batch is harmless, so a hard kill costs a little re-reading.

Export needs no checkpoint: it rewrites its output from the start (the CLI writes to a
temporary file and renames it into place only when complete).

Both are long jobs (:mod:`consumer.replay.job`): progress, stopping and the checkpoint
follow its one convention. Nothing here touches a terminal.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from consumer.core.codec import DecodeError, Event, decode
from consumer.core.plan import Outcome
from consumer.core.signature import SignatureError, sign, verify
from consumer.core.times import now_ms
from consumer.replay.job import Checkpoint, Job
from consumer.store.base import HistoryEntry, HistoryStore, IngestStore, MetaStore

__all__ = [
    "IMPORT_SOURCE",
    "ExportReport",
    "ImportReport",
    "ImportStore",
    "LineError",
    "RejectedLine",
    "archive_line",
    "checkpoint_key",
    "export_archive",
    "import_archive",
    "parse_line",
]

IMPORT_SOURCE = "import"

_MAX_REJECTED_KEPT = 1000  # details kept for the report; the count is always exact


class LineError(ValueError):
    """One archive line that cannot be imported. ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class RejectedLine:
    line: int  # 1-based line number in the file
    reason: str  # not_json, not_a_delivery, bad_signature, or the codec's reason
    detail: str


@dataclass(slots=True)
class ImportReport:
    """Counts cover the whole file, including lines done by an interrupted earlier run
    (restored from its checkpoint); ``rejected`` details only this run's lines."""

    path: str
    total_lines: int = 0
    lines_done: int = 0  # lines of the file processed so far (all runs)
    resumed_at: int = 0  # lines skipped because an earlier run had done them
    accepted: int = 0
    duplicates: int = 0
    rejected_count: int = 0
    rejected: list[RejectedLine] = field(default_factory=list)
    batches: int = 0  # in this run
    interrupted: bool = False
    elapsed_s: float = 0.0  # this run
    events_this_run: int = 0  # decoded events ingested in this run


@dataclass(slots=True)
class ExportReport:
    scanned: int = 0  # history entries read
    written: int = 0  # lines written (entries that passed the filters)
    interrupted: bool = False
    elapsed_s: float = 0.0


# ---------------------------------------------------------------------------- lines


def parse_line(line: bytes, *, verify_secret: bytes | None = None) -> Event:
    """One archive line to an event. Without ``verify_secret`` the signature is not looked
    at (archives are trusted local files); with it, a missing or wrong one is rejected.
    The freshness window does not apply: archived signatures are old by nature."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise LineError("not_json", f"line is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), str):
        raise LineError(
            "not_a_delivery",
            'expected {"signature": "...", "body": "<raw body>"} with body a string',
        )
    body = doc["body"].encode()
    if verify_secret is not None:
        signature = doc.get("signature")
        try:
            verify(
                signature if isinstance(signature, str) else None,
                body,
                verify_secret,
                now_ms=0,
                tolerance_ms=0,
            )
        except SignatureError as exc:
            raise LineError("bad_signature", str(exc)) from None
    try:
        return decode(body)
    except DecodeError as exc:
        raise LineError(exc.reason, f"body: {exc}") from None


def archive_line(entry: HistoryEntry, sign_secret: bytes | None = None) -> bytes:
    """One history entry as an archive line (newline included). The body is the stored
    bytes as text (the codec only accepts UTF-8 JSON, so they always are); the signature is
    recomputed with ``sign_secret`` or left empty."""
    body = entry.raw.decode()
    signature = ""
    if sign_secret is not None:
        signature = sign(sign_secret, entry.raw, _signature_time(entry))
    return orjson.dumps({"signature": signature, "body": body}) + b"\n"


def _signature_time(entry: HistoryEntry) -> int:
    # As Livepeer does, t is the body's send timestamp; bare tasks have none, and then the
    # time we received the event is the closest thing to a send time.
    try:
        doc = orjson.loads(entry.raw)
    except orjson.JSONDecodeError:
        return entry.received_at
    timestamp = doc.get("timestamp") if isinstance(doc, dict) else None
    if isinstance(timestamp, int) and not isinstance(timestamp, bool) and timestamp >= 0:
        return timestamp
    return entry.received_at


# ---------------------------------------------------------------------------- import


def checkpoint_key(path: Path) -> str:
    """The meta key of an import's checkpoint: the same file, unchanged, gets the same key;
    an edited or replaced file starts over."""
    resolved = path.resolve()
    stat = resolved.stat()
    identity = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return "import:" + hashlib.sha256(identity.encode()).hexdigest()[:32]


class ImportStore(IngestStore, MetaStore, Protocol):
    """What an import needs: to ingest, and to keep its checkpoint."""


async def import_archive(
    store: ImportStore,
    path: Path,
    *,
    verify_secret: bytes | None = None,
    batch_size: int = 512,
    job: Job | None = None,
    fire_handlers: bool = False,
) -> ImportReport:
    """Fold an archive into ``store``, resuming an interrupted earlier run of the same
    file. Bad lines are reported and skipped; a line is either taken whole or not at all
    (one line is one event). Progress is counted in lines. Phase changes reach the
    outbox (and live handlers) only with ``fire_handlers``: an archive is the past."""
    started = time.monotonic()
    job = job or Job()
    checkpoint = Checkpoint(store, checkpoint_key(path))
    report = ImportReport(_resolved(path), total_lines=_count_lines(path))
    saved = await checkpoint.load()
    if saved is not None:
        _restore(report, saved)
        report.resumed_at = report.lines_done

    batch: list[Event] = []
    batch_rejected: list[RejectedLine] = []
    batch_end = report.lines_done  # last line number covered by the batch being built

    async def flush() -> bool:
        """Commit the batch, then checkpoint; True when asked to stop."""
        nonlocal batch, batch_rejected
        if batch:
            result = await store.ingest(
                batch, IMPORT_SOURCE, now_ms(), record_changes=fire_handlers
            )
            report.accepted += sum(1 for o in result.outcomes if o == Outcome.ACCEPTED)
            report.duplicates += sum(1 for o in result.outcomes if o == Outcome.DUPLICATE)
            report.events_this_run += len(batch)
        # Rejections count only now, with their batch, so that the counts saved in the
        # checkpoint describe exactly the lines it says are done.
        report.rejected_count += len(batch_rejected)
        room = _MAX_REJECTED_KEPT - len(report.rejected)
        report.rejected.extend(batch_rejected[: max(0, room)])
        report.lines_done = batch_end
        report.batches += 1
        batch, batch_rejected = [], []
        stopping = job.batch_done()
        await checkpoint.save(_checkpoint(report), force=stopping)
        job.report(report.lines_done - report.resumed_at, report.total_lines - report.resumed_at)
        return stopping

    for number, line in _numbered_lines(path, skip=report.lines_done):
        batch_end = number
        if line.strip():
            try:
                batch.append(parse_line(line, verify_secret=verify_secret))
            except LineError as exc:
                batch_rejected.append(RejectedLine(number, exc.reason, exc.detail))
        if len(batch) + len(batch_rejected) >= batch_size and await flush():
            report.interrupted = True
            break
    else:
        if batch_end > report.lines_done:
            # A stop asked for during the last batch has nothing left to stop: the file
            # is in, so it counts as complete.
            await flush()
        await checkpoint.clear()  # done: a later import of this file starts over
    report.elapsed_s = time.monotonic() - started
    return report


def _checkpoint(report: ImportReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "lines": report.lines_done,
        "accepted": report.accepted,
        "duplicates": report.duplicates,
        "rejected": report.rejected_count,
    }


def _restore(report: ImportReport, saved: dict[str, Any]) -> None:
    report.lines_done = int(saved["lines"])
    report.accepted = int(saved.get("accepted", 0))
    report.duplicates = int(saved.get("duplicates", 0))
    report.rejected_count = int(saved.get("rejected", 0))


# The command owns its event loop: blocking reads of a local file between batches delay
# nothing else, and reading in a thread would cost more than it saves.
def _numbered_lines(path: Path, *, skip: int) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` from 1, after the first ``skip`` lines (read, not decoded)."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if number > skip:
                yield number, line


def _resolved(path: Path) -> str:
    return str(path.resolve())


def _count_lines(path: Path) -> int:
    """Lines in the file (a last line without a newline counts), for the progress total."""
    count = 0
    last = b"\n"
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


# ---------------------------------------------------------------------------- export


async def export_archive(
    store: HistoryStore,
    out: IO[bytes],
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    task_id: str | None = None,
    sign_secret: bytes | None = None,
    page_size: int = 1000,
    job: Job | None = None,
) -> ExportReport:
    """Write the history (in arrival order) to ``out`` as archive lines. ``since_ms`` and
    ``until_ms`` bound the event's ``createdAt``, both inclusive. Progress is counted in
    history entries read, out of the store's event count (unknown with ``task_id``)."""
    started = time.monotonic()
    job = job or Job()
    report = ExportReport()
    total = None if task_id is not None else (await store.stats()).events
    seq = 0
    while True:
        entries = await store.history_after(seq, page_size, task_id=task_id)
        if not entries:
            break
        seq = entries[-1].seq
        report.scanned += len(entries)
        chunk = [
            archive_line(entry, sign_secret)
            for entry in entries
            if (since_ms is None or entry.created_at >= since_ms)
            and (until_ms is None or entry.created_at <= until_ms)
        ]
        out.write(b"".join(chunk))
        report.written += len(chunk)
        job.report(report.scanned, max(total, report.scanned) if total is not None else None)
        if job.batch_done():
            report.interrupted = True
            break
    out.flush()
    report.elapsed_s = time.monotonic() - started
    return report
