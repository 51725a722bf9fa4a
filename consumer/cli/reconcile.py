"""The ``phasewatch reconcile`` command: one pass over Livepeer Studio's task list, with a
progress bar and a summary. Terminal side only; the walk is
:func:`consumer.sources.reconcile.reconcile_pass`.

The changes a pass finds are recorded in the outbox: a running ``serve`` delivers them
to the handlers. Ctrl-C ends the pass after the page in flight (the watermark covers
what was folded); running the command again goes on from there.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from consumer.cli.args import time_ms
from consumer.cli.replay import EXIT_INTERRUPTED, _Display, _stop_on_sigint
from consumer.replay.job import BatchHook, Job
from consumer.service import open_store
from consumer.settings import Settings
from consumer.sources.reconcile import PassReport, reconcile_pass
from consumer.sources.studio import AuthError, StudioClient, StudioError

__all__ = ["add_command", "handles", "run"]


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "reconcile",
        help="fold Livepeer Studio's task list into the store (tasks whose webhooks were lost)",
        description="List the tasks Studio updated since the saved watermark (or --since), "
        "oldest first, and fold each as a snapshot (source 'reconcile'). Changes it reveals "
        "are recorded for the handlers (a running `serve` delivers them). Needs "
        "PHASEWATCH_LIVEPEER_API_KEY.",
        epilog="exit status: 0 done, 1 Studio could not be read to the end, 2 no key or "
        "the key refused, 130 interrupted",
    )
    cmd.add_argument(
        "--since",
        type=time_ms,
        help="status.updatedAt to start from (ISO-8601 or Unix ms); default: the saved "
        "watermark, less PHASEWATCH_RECONCILE_OVERLAP_S",
    )
    cmd.set_defaults(reconcile_command=True)


def handles(args: argparse.Namespace) -> bool:
    return getattr(args, "reconcile_command", False) is True


async def run(
    settings: Settings, args: argparse.Namespace, *, on_batch: BatchHook | None = None
) -> int:
    key = settings.livepeer_api_key
    if key is None:
        _say("phasewatch: reconcile needs PHASEWATCH_LIVEPEER_API_KEY (a Livepeer Studio API key)")
        return 2
    store = open_store(settings)
    await store.open()
    job = Job(on_batch=on_batch)
    try:
        async with StudioClient(settings.livepeer_api_url, key.get_secret_value()) as client:
            with _stop_on_sigint(job.stop), _Display("reconcile", "tasks") as job.progress:
                report = await reconcile_pass(
                    store,
                    client,
                    since=args.since,
                    overlap_ms=int(settings.reconcile_overlap_s * 1000),
                    job=job,
                )
    except AuthError as exc:
        _say(f"phasewatch: {exc}")
        return 2
    except StudioError as exc:
        _say(f"phasewatch: reconcile stopped: {exc}; what was folded is kept, run it again")
        return 1
    finally:
        await store.close()
    _say(_summary(report))
    if report.interrupted:
        _say("phasewatch: reconcile interrupted; run the same command again to go on")
        return EXIT_INTERRUPTED
    return 0


def _summary(report: PassReport) -> str:
    return (
        f"reconcile: {_n(report.pages, 'page')}, {_n(report.seen, 'task')} seen, "
        f"{_n(report.repaired, 'task')} repaired ({_n(report.new, 'snapshot')} new to the "
        f"store, {report.rejected} rejected, {_n(report.requests, 'request')}); "
        f"updates from {_when(report.start)} to {_when(report.watermark)}"
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _when(ms: int | float) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms"


def _say(message: str) -> None:
    print(message, file=sys.stderr)
