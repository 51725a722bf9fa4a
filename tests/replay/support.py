"""Helpers for the import/export/replay tests: a parser built the way consumer.cli.main builds
it, settings on a SQLite file, and a comparable picture of a store's contents."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from consumer.cli import replay as cli_replay
from consumer.settings import Settings
from consumer.store.sqlite.store import SQLiteStore


def parse(*argv: str) -> argparse.Namespace:
    """Arguments as ``phasewatch ARGV`` would parse them once cli.py adds our commands."""
    parser = argparse.ArgumentParser(prog="phasewatch")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_replay.add_commands(sub)
    args = parser.parse_args(list(argv))
    assert cli_replay.handles(args)
    return args


def sqlite_settings(db: Path, **extra: Any) -> Settings:
    return Settings(database_url=f"sqlite:///{db}", **extra)


async def contents(db: Path) -> tuple[dict[str, dict[str, Any]], dict[str, bytes]]:
    """Everything import and export are about: the view (task per id) and the history
    (raw bytes per event id). Receipt times and sources differ between stores on purpose."""
    store = SQLiteStore(db)
    await store.open()
    try:
        tasks: dict[str, dict[str, Any]] = {}
        history: dict[str, bytes] = {}
        seq = 0
        while entries := await store.history_after(seq, 1000):
            seq = entries[-1].seq
            for entry in entries:
                history[entry.event_id] = entry.raw
                if entry.task_id is not None and entry.task_id not in tasks:
                    stored = await store.get_task(entry.task_id)
                    assert stored is not None
                    tasks[entry.task_id] = stored.task
        assert (await store.stats()).tasks == len(tasks)
        return tasks, history
    finally:
        await store.close()


async def meta(db: Path, key: str) -> str | None:
    store = SQLiteStore(db)
    await store.open()
    try:
        return await store.get_meta(key)
    finally:
        await store.close()
