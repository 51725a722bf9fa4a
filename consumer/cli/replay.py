"""The ``phasewatch import``, ``export`` and ``replay kafka`` commands: moving history
between stores and re-reading it from Kafka.

This module is the terminal side only: arguments, progress display, Ctrl-C and messages.
The work is :mod:`consumer.replay.archive` (files) and
:func:`~consumer.sources.kafka.window.replay_topics`.
``consumer.cli.main`` adds these commands to its parser with :func:`add_commands` and hands
the parsed arguments to :func:`run` when :func:`handles` says they are ours.

Ctrl-C finishes the batch in flight, saves the checkpoint and exits with 130; running
the same command again continues where it stopped (a second Ctrl-C aborts at once, which
is safe too: every batch is one transaction and redoing one is harmless). Export has no
checkpoint: it writes ``FILE.partial`` and renames it to ``FILE`` only when complete, so
an interrupted export leaves ``FILE`` as it was, and re-running simply rewrites it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from consumer.cli.args import positive, time_ms
from consumer.dispatch.loading import load_subscriptions
from consumer.replay.archive import export_archive, import_archive
from consumer.replay.handlers import replay_changes, replay_handlers, run_key
from consumer.replay.job import BatchHook, Interrupted, Job
from consumer.replay.rebuild import rebuild
from consumer.service import open_store
from consumer.settings import Settings
from consumer.sources.kafka.window import replay_topics
from consumer.store.base import Store

__all__ = ["EXIT_INTERRUPTED", "add_commands", "handles", "run"]

EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT
_PLAIN_EVERY_S = 5.0  # progress line interval when stderr is not a terminal


# ---------------------------------------------------------------------------- arguments


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``import``, ``export`` and ``replay kafka`` to the ``phasewatch`` subcommands."""
    imp = sub.add_parser(
        "import",
        help="fold an archive of raw deliveries (JSONL) into the store",
        description="Decode each line's body and fold it into the store (source 'import'). "
        "Idempotent: events already stored are counted as duplicates. Bad lines are "
        "reported with their line numbers and skipped. Ctrl-C stops after the batch in "
        "flight; running the same command again skips the lines already done.",
        epilog="exit status: 0 all lines imported, 1 some lines rejected, 130 interrupted",
    )
    imp.add_argument("file", type=Path, help='JSONL: {"signature": ..., "body": ...} per line')
    imp.add_argument(
        "--verify-secret",
        metavar="SECRET",
        help="reject lines whose Livepeer-Signature does not match SECRET (default: "
        "signatures are not checked; archives are trusted local files)",
    )
    imp.add_argument("--batch-size", type=positive, help="lines per store transaction")
    _fire_handlers_flag(imp)
    imp.set_defaults(replay_action="import")

    exp = sub.add_parser(
        "export",
        help="write the store's history as an archive of raw deliveries (JSONL)",
        description="Write each history entry, in arrival order, as a line "
        '{"signature": ..., "body": <raw body exactly as stored>}. Restartable by '
        "re-running: the output is rewritten from the start (with --output, FILE is "
        "replaced only once the export is complete).",
    )
    exp.add_argument("--since", type=time_ms, help="event createdAt at or after (ISO-8601 or ms)")
    exp.add_argument("--until", type=time_ms, help="event createdAt at or before (ISO-8601 or ms)")
    exp.add_argument("--task", metavar="ID", help="only this task's events")
    exp.add_argument("--output", "-o", type=Path, metavar="FILE", help="default: stdout")
    exp.add_argument(
        "--sign-secret",
        metavar="SECRET",
        help="sign each body with SECRET (t = the body's timestamp, else the receipt "
        "time); default: an empty signature",
    )
    exp.set_defaults(replay_action="export")

    replay = sub.add_parser("replay", help="re-read history from a source into the store")
    sources = replay.add_subparsers(dest="replay_source", required=True)
    kafka = sources.add_parser(
        "kafka",
        help="fold a time window of the Kafka topics into the store",
        description="Read the topics from --since (by record timestamp) up to their end "
        "offsets as of the start, or up to --until, and fold the records into the store "
        "(source 'kafka-replay'). Uses manual assignment and no consumer group: the "
        "service's committed offsets are never touched. Poison records are counted, not "
        "fatal. Ctrl-C stops after the batch in flight; the same command resumes.",
        epilog="exit status: 0 done, 130 interrupted",
    )
    kafka.add_argument(
        "--since", type=time_ms, required=True, help="record timestamp (ISO-8601 or ms)"
    )
    kafka.add_argument("--until", type=time_ms, help="last record timestamp (inclusive)")
    kafka.add_argument(
        "--topic",
        action="append",
        default=[],
        help="repeatable; default: PHASEWATCH_KAFKA_TOPICS",
    )
    kafka.add_argument("--batch-size", type=positive, help="records per store transaction")
    _fire_handlers_flag(kafka)
    kafka.set_defaults(replay_action="replay-kafka")

    rebuild_cmd = sources.add_parser(
        "rebuild",
        help="fold the stored history into a fresh view and swap it in atomically",
        description="Fold every task's stored history into a staged view, fold in what "
        "arrived meanwhile, and swap it in atomically. Fires no handlers. Ctrl-C keeps "
        "what was staged; the same command continues from there.",
        epilog="exit status: 0 done (--check: no differences), 1 --check found "
        "differences, 130 interrupted",
    )
    rebuild_cmd.add_argument(
        "--check", action="store_true", help="compare with the live view; change nothing"
    )
    rebuild_cmd.set_defaults(replay_action="rebuild")

    handlers_cmd = sources.add_parser(
        "handlers",
        help="re-run handlers for the phase changes of a time window",
        description="Compute the phase changes whose status.updatedAt is in [--since, "
        "--until) from the ordered history, and deliver them to the chosen handlers "
        "(PHASEWATCH_HANDLERS and the built-ins), marked as replays and recorded apart "
        "from live deliveries. Ctrl-C stops after the change in flight; the same command "
        "continues after the last change it finished.",
        epilog="exit status: 0 done, 1 some deliveries dead, 130 interrupted",
    )
    handlers_cmd.add_argument("--since", type=time_ms, required=True)
    handlers_cmd.add_argument("--until", type=time_ms)
    handlers_cmd.add_argument("--task", metavar="ID")
    handlers_cmd.add_argument("--phase", action="append", default=[], help="repeatable")
    handlers_cmd.add_argument(
        "--handler", action="append", default=[], help="handler name, repeatable (default: all)"
    )
    handlers_cmd.add_argument(
        "--dry-run", action="store_true", help="list the changes; deliver nothing"
    )
    handlers_cmd.set_defaults(replay_action="replay-handlers")


def _fire_handlers_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fire-handlers",
        action="store_true",
        help="also record the phase changes for live handlers (default: history only; "
        "use `replay handlers` to re-run handlers on purpose)",
    )


def handles(args: argparse.Namespace) -> bool:
    """Whether ``args`` were parsed for one of this module's commands."""
    return getattr(args, "replay_action", None) is not None


# ---------------------------------------------------------------------------- commands


async def run(
    settings: Settings, args: argparse.Namespace, *, on_batch: BatchHook | None = None
) -> int:
    """Run the command ``args`` names; returns the exit status. ``on_batch`` is called
    after each committed batch (raising ``KeyboardInterrupt`` from it acts as Ctrl-C)."""
    action = args.replay_action
    if action == "export" and None not in (args.since, args.until) and args.since > args.until:
        return _fail("--since is after --until", status=2)
    if action == "replay-kafka" and not settings.kafka_bootstrap_servers:
        return _fail("replay kafka needs PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS", status=2)
    if action == "import" and not args.file.is_file():
        return _fail(f"no such file: {args.file}", status=2)
    store = open_store(settings)
    await store.open()
    job = Job(on_batch=on_batch)
    try:
        with _stop_on_sigint(job.stop):
            if action == "import":
                return await _import(store, settings, args, job)
            if action == "export":
                return await _export(store, args, job)
            if action == "rebuild":
                return await _rebuild(store, args, job)
            if action == "replay-handlers":
                return await _replay_handlers(store, settings, args, job)
            return await _replay_kafka(store, settings, args, job)
    finally:
        await store.close()


async def _import(
    store: Store,
    settings: Settings,
    args: argparse.Namespace,
    job: Job,
) -> int:
    with _Display("import", "lines") as job.progress:
        report = await import_archive(
            store,
            args.file,
            verify_secret=args.verify_secret.encode() if args.verify_secret else None,
            batch_size=args.batch_size or settings.ingest_max_batch,
            job=job,
            fire_handlers=args.fire_handlers,
        )
    rate = report.events_this_run / report.elapsed_s if report.elapsed_s > 0 else 0.0
    _say(
        f"import {report.path}: {report.lines_done} of {report.total_lines} lines done, "
        f"{report.accepted} accepted, {report.duplicates} duplicates, "
        f"{report.rejected_count} rejected ({report.events_this_run} events in "
        f"{report.elapsed_s:.1f} s, {rate:,.0f} events/s)"
    )
    if report.resumed_at:
        _say(f"  resumed after line {report.resumed_at} (done by an interrupted earlier run)")
    for rejected in report.rejected:
        _say(f"  line {rejected.line}: {rejected.reason}: {rejected.detail}")
    unlisted = report.rejected_count - len(report.rejected)
    if unlisted:
        _say(f"  ({unlisted} more rejected lines not listed: earlier run, or over the limit)")
    if report.interrupted:
        _say(
            f"phasewatch: import interrupted after line {report.lines_done} of "
            f"{report.total_lines}; run the same command again to continue from there"
        )
        return EXIT_INTERRUPTED
    return 1 if report.rejected_count else 0


async def _export(store: Store, args: argparse.Namespace, job: Job) -> int:
    target: Path | None = args.output
    with _Output(target) as out, _Display("export", "events") as job.progress:
        report = await export_archive(
            store,
            out.stream,
            since_ms=args.since,
            until_ms=args.until,
            task_id=args.task,
            sign_secret=args.sign_secret.encode() if args.sign_secret else None,
            job=job,
        )
        if not report.interrupted:
            out.commit()
    where = str(target) if target is not None else "stdout"
    if report.interrupted:
        left = f"{where} was left as it was" if target is not None else "stdout is incomplete"
        _say(
            f"phasewatch: export interrupted ({left}); run the same command again: "
            "export always rewrites its output from the start"
        )
        return EXIT_INTERRUPTED
    _say(
        f"export: {report.written} of {report.scanned} history entries written to {where} "
        f"in {report.elapsed_s:.1f} s"
    )
    return 0


async def _replay_kafka(
    store: Store,
    settings: Settings,
    args: argparse.Namespace,
    job: Job,
) -> int:
    try:
        with _Display("replay", "offsets") as job.progress:
            stats = await replay_topics(
                settings.kafka_connection(),
                args.topic or settings.topics(),
                store,
                args.since,
                args.until,
                batch_size=args.batch_size or settings.kafka_max_batch,
                job=job,
                fire_handlers=args.fire_handlers,
            )
    except (ValueError, ConnectionError) as exc:
        return _fail(str(exc), status=1)
    _say(
        f"replay kafka: {stats.records} records in the window from {stats.partitions} "
        f"partitions, {stats.accepted} accepted, {stats.duplicates} duplicates, "
        f"{stats.poison} poison"
        + (f", {stats.outside} outside the window skipped" if stats.outside else "")
        + (" (resumed from a checkpoint)" if stats.resumed else "")
    )
    for sample in stats.poison_samples:
        _say(f"  poison {sample}")
    if stats.interrupted:
        _say(
            "phasewatch: replay interrupted; the position of each partition is saved: run "
            "the same command (same --since/--until) again to continue from there"
        )
        return EXIT_INTERRUPTED
    return 0


def _say(message: str) -> None:
    # stderr: stdout may be carrying an export.
    print(message, file=sys.stderr)


def _fail(message: str, *, status: int) -> int:
    _say(f"phasewatch: {message}")
    return status


# ---------------------------------------------------------------------------- Ctrl-C


@contextlib.contextmanager
def _stop_on_sigint(stop: asyncio.Event) -> Iterator[None]:
    """The first Ctrl-C sets ``stop`` (the work ends after its batch in flight); the handler
    that was there before (asyncio.run's: cancel at once) is back for a second one."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    installed = False

    def restore() -> None:
        nonlocal installed
        if installed:
            installed = False
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)

    def first_interrupt() -> None:
        stop.set()
        _say("phasewatch: stopping after the batch in flight (Ctrl-C again to abort now)")
        restore()

    try:
        loop.add_signal_handler(signal.SIGINT, first_interrupt)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # no loop signal handlers here (Windows, not the main thread): Ctrl-C aborts
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------------- output


class _Output:
    """Where an export goes. A regular file (or a new one) is written as ``FILE.partial``
    and renamed over ``FILE`` (after an fsync) on :meth:`commit`; left uncommitted, the
    partial file is removed. Anything else (stdout, a device such as /dev/null, a FIFO) is
    written directly: renaming over it would replace the device with a file."""

    def __init__(self, target: Path | None) -> None:
        self._target: Path | None = None  # set when going through a partial file
        self._partial: Path | None = None
        self._direct = target
        if target is not None and (not target.exists() or target.resolve().is_file()):
            # Through a symlink, the file it points to is replaced, not the link.
            self._target = target.resolve()
            self._partial = self._target.with_name(self._target.name + ".partial")
            self._direct = None
        self._file: IO[bytes] | None = None
        self._committed = False

    @property
    def stream(self) -> IO[bytes]:
        return self._file if self._file is not None else sys.stdout.buffer

    def __enter__(self) -> _Output:
        if self._partial is not None:
            self._file = self._partial.open("wb")
        elif self._direct is not None:
            self._file = self._direct.open("wb")
        return self

    def commit(self) -> None:
        if self._file is None or self._target is None or self._partial is None:
            self.stream.flush()
            self._committed = True
            return
        self._file.flush()
        os.fsync(self._file.fileno())  # the archive may be the only copy: durable first
        self._file.close()
        self._partial.replace(self._target)
        self._committed = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._partial is not None and not self._committed:
            self._partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- progress


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self._unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        shown = "?" if speed is None else f"{speed:,.0f}"
        return Text(f"{shown} {self._unit}/s", style="progress.data.speed")


class _Display:
    """Progress on stderr: a rich bar with rate and ETA on a terminal, otherwise a plain
    line every few seconds (logs and CI have no use for redraws)."""

    def __init__(self, label: str, unit: str) -> None:
        self._label = label
        self._unit = unit
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._started = time.monotonic()
        self._shown_at = self._started

    def __enter__(self) -> _Display:
        if sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(self._unit),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=None)
        return self

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        now = time.monotonic()
        if now - self._shown_at < _PLAIN_EVERY_S:
            return
        self._shown_at = now
        rate = done / (now - self._started) if now > self._started else 0.0
        line = f"{self._label}: {done:,}"
        if total:
            line += f"/{total:,} {self._unit} ({100 * done / total:.0f}%)"
            if rate > 0:
                line += f", ETA {_duration((total - done) / rate)}"
        else:
            line += f" {self._unit}"
        _say(f"{line}, {rate:,.0f} {self._unit}/s")

    def __exit__(self, *exc_info: Any) -> None:
        if self._bar is not None:
            self._bar.stop()


def _duration(seconds: float) -> str:
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


async def _rebuild(store: Store, args: argparse.Namespace, job: Job) -> int:
    try:
        with _Display("rebuild", "tasks") as job.progress:
            report = await rebuild(store, check=args.check, job=job)
    except Interrupted as exc:
        _say(f"{exc}; what was staged is kept: run the same command again to continue")
        return 130
    if args.check:
        _say(
            f"rebuild --check: {report.tasks} tasks from {report.events} events; "
            f"{len(report.different)} differ, {len(report.missing)} missing from the view, "
            f"{report.extra} in the view without history"
        )
        for task_id in report.different[:50]:
            _say(f"  differs: {task_id}")
        for task_id in report.missing[:50]:
            _say(f"  missing: {task_id}")
        return 1 if report.different or report.missing or report.extra else 0
    resumed = " (resumed)" if report.resumed else ""
    _say(f"rebuild{resumed}: view swapped in, {report.tasks} tasks from {report.events} events")
    return 0


async def _replay_handlers(
    store: Store, settings: Settings, args: argparse.Namespace, job: Job
) -> int:
    subs = load_subscriptions(settings.handler_refs(), settings)
    if args.handler:
        unknown = sorted(set(args.handler) - {s.name for s in subs})
        if unknown:
            return _fail(
                f"no such handler(s): {unknown}; configured: {[s.name for s in subs]}", status=2
            )
        subs = [s for s in subs if s.name in args.handler]
    if not subs:
        return _fail("no handlers configured (PHASEWATCH_HANDLERS or built-ins)", status=2)
    changes = await replay_changes(
        store, since=args.since, until=args.until, task_id=args.task, phases=args.phase
    )
    if args.dry_run:
        for c in changes:
            print(f"{c.changed_at}  {c.task_id}  {c.previous_phase} -> {c.phase}  ({c.event_id})")
        _say(f"dry run: {len(changes)} change(s) for {[s.name for s in subs]}")
        return 0
    key = run_key(
        since=args.since,
        until=args.until,
        task=args.task,
        phase=args.phase,
        handlers=[s.name for s in subs],
    )
    for sub in subs:
        if sub.on_start is not None:
            await sub.on_start()
    try:
        with _Display("replay handlers", "changes") as job.progress:
            report = await replay_handlers(store, subs, changes, run_key=key, job=job)
    except Interrupted as exc:
        _say(f"{exc}; run the same command again to continue")
        return 130
    finally:
        for sub in subs:
            if sub.on_stop is not None:
                await sub.on_stop()
    _say(
        f"replay handlers: {report.changes} change(s), {report.delivered} delivered, "
        f"{report.dead} dead, {report.skipped} filtered out"
        + (f" (resumed after {report.resumed_from})" if report.resumed_from else "")
    )
    return 1 if report.dead else 0
