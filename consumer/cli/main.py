"""The ``phasewatch`` command line: ``serve``, ``tasks get|list``, ``dead-letters``,
``import``, ``export``, ``replay kafka|rebuild|handlers``, ``reconcile`` and ``send``.

Settings come from ``PHASEWATCH_*`` variables (listed by ``phasewatch --help``); the few
flags here are per-invocation choices, not configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from pydantic import ValidationError

from consumer import __version__
from consumer.cli import reconcile as cli_reconcile
from consumer.cli import replay as cli_replay
from consumer.cli.args import phase, positive, time_ms
from consumer.core.secrets import redact, redact_text
from consumer.core.signature import sign
from consumer.dispatch.loading import HandlerLoadError
from consumer.logs import configure as configure_logging
from consumer.service import open_store, serve
from consumer.settings import ConfigError, Settings, describe_invalid
from consumer.store.base import DeliveryStatus, Store, StoreOpenError, TaskQuery

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phasewatch",
        description="React to Livepeer task phase changes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configuration (environment variables):\n" + Settings.help_text(),
    )
    parser.add_argument("--version", action="version", version=f"phasewatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "serve",
        help="run the webhook receiver, read API and handlers",
        epilog="configuration (environment variables):\n" + Settings.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    sub.add_parser(
        "migrate",
        help="apply pending schema migrations to the store (serve does too, unless"
        " PHASEWATCH_DATABASE_MIGRATE=false), then exit",
    )
    tasks = sub.add_parser("tasks", help="read materialized tasks from the store")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    get = tasks_sub.add_parser("get", help="print one task (credentials hidden)")
    get.add_argument("task_id")
    lst = tasks_sub.add_parser("list", help="list tasks, oldest update first")
    lst.add_argument("--phase", action="append", default=[], type=phase, help="repeatable")
    lst.add_argument("--type", action="append", default=[], help="repeatable")
    lst.add_argument(
        "--since", type=time_ms, help="status.updatedAt at or after (ISO-8601 or Unix ms)"
    )
    lst.add_argument("--limit", type=positive, default=100)
    lst.add_argument("--json", action="store_true", help="one JSON task per line")
    history = tasks_sub.add_parser(
        "history", help="a task's events in arrival order and its phase changes"
    )
    history.add_argument("task_id")
    history.add_argument("--json", action="store_true", help="the API's JSON document")

    dead = sub.add_parser("dead-letters", help="deliveries that failed for good")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True)
    dl_list = dead_sub.add_parser("list", help="list dead letters")
    dl_list.add_argument("--handler")
    dl_list.add_argument("--limit", type=positive, default=100)
    dl_list.add_argument("--json", action="store_true", help="one JSON object per line")
    for verb, text in (("retry", "deliver again (attempts start over)"), ("drop", "give up")):
        p = dead_sub.add_parser(verb, help=text)
        p.add_argument("seqs", nargs="*", type=int, help="change seqs (see list)")
        p.add_argument("--handler")
        p.add_argument("--all", action="store_true", help="every dead letter (of --handler)")

    cli_replay.add_commands(sub)
    cli_reconcile.add_command(sub)

    send = sub.add_parser("send", help="POST a deliveries file to a webhook endpoint")
    send.add_argument("file", type=Path, help='JSONL: {"signature": ..., "body": ...} per line')
    send.add_argument("--url", default="http://127.0.0.1:8080/webhooks/livepeer")
    send.add_argument("--concurrency", type=positive, default=8)
    send.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for the server to come up (default 10)",
    )
    send.add_argument(
        "--in-order", action="store_true", help="send one at a time, sorted by status.updatedAt"
    )
    send.add_argument(
        "--resign", metavar="SECRET", help="re-sign each body with SECRET and the current time"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"phasewatch: {describe_invalid(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    for unknown in Settings.unknown_variables(os.environ):
        logging.getLogger("consumer.settings").warning(
            "%s is not a phasewatch setting: ignored", unknown
        )
    try:
        return _command(settings, args)
    except (HandlerLoadError, StoreOpenError, ConfigError) as exc:
        # The user's configuration, module or file, not phasewatch: one line naming it,
        # no traceback.
        print(f"phasewatch: {exc}", file=sys.stderr)
        return 2


def _command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "serve":
        _run_fast(serve(settings))
        return 0
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    if args.command == "tasks":
        return asyncio.run(_tasks(settings, args))
    if args.command == "dead-letters":
        return asyncio.run(_dead_letters(settings, args))
    if cli_replay.handles(args):
        try:
            return asyncio.run(cli_replay.run(settings, args))
        except KeyboardInterrupt:  # a second Ctrl-C: the first asked for a clean stop
            return 130
    if cli_reconcile.handles(args):
        try:
            return asyncio.run(cli_reconcile.run(settings, args))
        except KeyboardInterrupt:  # a second Ctrl-C: the first asked for a clean stop
            return 130
    return asyncio.run(_send(args))


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run the service on uvloop where it is installed (about a quarter more webhooks/s
    here, see bench/), else on the standard loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional: absent on Windows
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _migrate(settings: Settings) -> int:
    """Open the store with migrations on (whatever PHASEWATCH_DATABASE_MIGRATE says): a
    migration Job, or an operator, runs them before the replicas start."""
    store = open_store(settings.model_copy(update={"database_migrate": True}))
    await store.open()
    try:
        applied = getattr(store, "migrations_applied", None)
        if applied is None:
            print("phasewatch: this store keeps no schema (memory://): nothing to migrate")
        elif applied:
            for step in applied:
                print(f"applied schema {step.version}: {step.name}")
        else:
            print("the schema is up to date")
        return 0
    finally:
        await store.close()


async def _tasks(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings)
    await store.open()
    try:
        if args.tasks_command == "get":
            stored = await store.get_task(args.task_id)
            if stored is None:
                print(f"phasewatch: no task {args.task_id!r}", file=sys.stderr)
                return 1
            sys.stdout.write(orjson.dumps(redact(stored.task), option=orjson.OPT_INDENT_2).decode())
            sys.stdout.write("\n")
            return 0
        if args.tasks_command == "history":
            return await _history(store, args.task_id, as_json=args.json)
        query = TaskQuery(tuple(args.phase), tuple(args.type), args.since, None, args.limit)
        page = await store.list_tasks(query)
        if args.json:
            for stored in page.tasks:
                print(orjson.dumps(redact(stored.task)).decode())
            return 0
        print(f"{'ID':<40} {'TYPE':<15} {'PHASE':<10} UPDATED (UTC)")
        for stored in page.tasks:
            task = stored.task
            kind = task.get("type") if isinstance(task.get("type"), str) else "?"
            print(f"{stored.id:<40} {kind:<15} {stored.phase:<10} {_when(stored.updated_at)}")
        filtered = bool(args.phase or args.type or args.since is not None)
        shown = len(page.tasks)
        if not filtered:
            total = (await store.stats()).tasks
            print(f"showing {shown} of {total} tasks", file=sys.stderr)
        elif page.next_cursor is not None:
            print(f"showing {shown} tasks; more match (raise --limit)", file=sys.stderr)
        else:
            print(f"{shown} matching tasks", file=sys.stderr)
        return 0
    finally:
        await store.close()


async def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings)
    await store.open()
    try:
        if args.dead_command == "list":
            dead = await store.list_deliveries([DeliveryStatus.DEAD], args.handler, args.limit)
            changes = {c.seq: c for c in await store.changes_by_seq([d.seq for d in dead])}
            for d in dead:
                change = changes.get(d.seq)
                row = {
                    "handler": d.handler,
                    "seq": d.seq,
                    "attempts": d.attempts,
                    "taskId": change.task_id if change else None,
                    "change": f"{change.previous_phase} -> {change.phase}" if change else None,
                    "error": redact_text(d.error or ""),
                }
                if args.json:
                    print(orjson.dumps(row).decode())
                else:
                    print(
                        f"{d.seq:>8}  {d.handler:<30} {row['taskId']}  {row['change']}"
                        f"  x{d.attempts}  {row['error']}"
                    )
            return 0
        if not args.seqs and not args.all:
            print("phasewatch: name the seqs to act on, or pass --all", file=sys.stderr)
            return 2
        unknown: list[int] = []
        if args.seqs:
            dead = await store.list_deliveries([DeliveryStatus.DEAD], args.handler, 1_000_000)
            unknown = sorted(set(args.seqs) - {d.seq for d in dead})
        to = DeliveryStatus.REDRIVE if args.dead_command == "retry" else DeliveryStatus.DROPPED
        moved = await store.set_delivery_status(
            DeliveryStatus.DEAD, to, handler=args.handler, seqs=args.seqs or None
        )
        verb = "queued for retry" if to is DeliveryStatus.REDRIVE else "dropped"
        print(f"{moved} dead letter(s) {verb}")
        if unknown:
            listed = ", ".join(map(str, unknown))
            whose = f" of handler {args.handler}" if args.handler else ""
            print(f"phasewatch: no dead letter{whose} with seq {listed}", file=sys.stderr)
            return 1
        return 0
    finally:
        await store.close()


def _when(ms: int | float) -> str:
    """Unix ms as ISO-8601 UTC; a value out of range as it is."""
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return str(ms)


async def _history(store: Store, task_id: str, *, as_json: bool) -> int:
    events = await store.task_history(task_id)
    if not events:
        print("phasewatch: no task with this id", file=sys.stderr)
        return 1
    changes = await store.task_changes(task_id)
    if as_json:
        doc = {
            "taskId": task_id,
            "events": [
                {
                    "seq": e.seq,
                    "eventId": e.event_id,
                    "event": e.kind,
                    "source": e.source,
                    "receivedAt": e.received_at,
                    "createdAt": e.created_at,
                    "verifiedBy": None if e.receipt is None else e.receipt.secret,
                }
                for e in events
            ],
            "phaseChanges": [
                {"seq": c.seq, "previousPhase": c.previous_phase, "phase": c.phase} for c in changes
            ],
        }
        print(orjson.dumps(doc).decode())
        return 0
    print(
        f"{'SEQ':>8}  {'RECEIVED (UTC)':<29} {'SOURCE':<13} {'EVENT':<16} {'VERIFIED BY':<12}"
        " EVENT ID"
    )
    for e in events:
        # The name (or index) of the webhook secret that verified it; "-": none did.
        verified = (e.receipt.secret if e.receipt is not None else None) or "-"
        print(
            f"{e.seq:>8}  {_when(e.received_at):<29} {e.source:<13} {e.kind:<16}"
            f" {verified:<12} {redact_text(e.event_id)}"
        )
    print()
    print(f"{'SEQ':>8}  {'CHANGED (UTC)':<29} CHANGE")
    for c in changes:
        print(f"{c.seq:>8}  {_when(c.changed_at):<29} {c.previous_phase} -> {c.phase}")
    return 0


async def _send(args: argparse.Namespace) -> int:
    deliveries = [orjson.loads(line) for line in args.file.read_bytes().splitlines() if line]
    if args.in_order:
        deliveries.sort(key=_order_key)
    counts: Counter[int] = Counter()
    first_errors: dict[int, str] = {}
    secret = args.resign.encode() if args.resign else None
    limit = asyncio.Semaphore(1 if args.in_order else max(1, args.concurrency))

    async def post(session: aiohttp.ClientSession, delivery: dict[str, Any]) -> None:
        body = delivery["body"].encode()
        signature = delivery.get("signature", "")
        if secret is not None:
            signature = sign(secret, body, time.time_ns() // 1_000_000)
        async with (
            limit,
            session.post(
                args.url,
                data=body,
                headers={
                    "Content-Type": "application/json",
                    "Livepeer-Signature": signature,
                    "User-Agent": "phasewatch-send",
                },
            ) as response,
        ):
            text = await response.text(errors="replace")
            counts[response.status] += 1
            if not 200 <= response.status < 300:
                first_errors.setdefault(response.status, redact_text(text.strip())[:300])

    async with aiohttp.ClientSession() as session:
        if not await _server_up(session, args.url, args.wait):
            print(
                f"phasewatch: nothing answers at {args.url} (waited {args.wait:g} s)",
                file=sys.stderr,
            )
            return 1
        if args.in_order:
            for delivery in deliveries:
                await post(session, delivery)
        else:
            await asyncio.gather(*(post(session, d) for d in deliveries))
    summary = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
    print(f"sent {len(deliveries)} deliveries to {args.url} ({summary})")
    for status, text in sorted(first_errors.items()):
        print(f"  first {status}: {text}")
    return 0 if all(200 <= s < 300 for s in counts) else 1


async def _server_up(session: aiohttp.ClientSession, url: str, wait_s: float) -> bool:
    """Whether something answers at ``url`` (any status), trying until ``wait_s`` passed:
    `send` right after `serve` in a script must not fail on the start-up gap."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            async with session.get(url) as response:
                await response.read()
                return True
        except aiohttp.ClientConnectionError:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)


def _order_key(delivery: dict[str, Any]) -> tuple[Any, ...]:
    try:
        body = orjson.loads(delivery["body"])
        snapshot = body["payload"]["task"]["snapshot"]
        return (snapshot["status"]["updatedAt"], body.get("createdAt", 0), body["id"])
    except (KeyError, TypeError, orjson.JSONDecodeError):
        return (float("inf"), 0, "")
