"""Helpers for the import/export/replay tests: a parser built the way consumer.cli.main builds
it, settings on a SQLite file or a database URL, and a comparable picture of a store's
contents."""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from consumer.cli import replay as cli_replay
from consumer.service import open_store
from consumer.settings import Settings
from consumer.store.base import Store

# Where a command's store is: a SQLite file, or a database URL (postgresql://...).
Target = Path | str

DATABASE_URL = "PHASEWATCH_DATABASE_URL"


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


def database_url(target: Target) -> str:
    return target if isinstance(target, str) else f"sqlite:///{target}"


def settings_for(target: Target, **extra: Any) -> Settings:
    """Settings as ``phasewatch`` reads them at start, with ``PHASEWATCH_DATABASE_URL``
    in the environment naming ``target``."""
    before = os.environ.get(DATABASE_URL)
    os.environ[DATABASE_URL] = database_url(target)
    try:
        return Settings(**extra)
    finally:
        if before is None:
            del os.environ[DATABASE_URL]
        else:
            os.environ[DATABASE_URL] = before


@asynccontextmanager
async def opened(target: Target) -> AsyncIterator[Store]:
    """The store a command on ``target`` opens (the CLI's backend for its URL)."""
    store = open_store(settings_for(target))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def contents(target: Target) -> tuple[dict[str, dict[str, Any]], dict[str, bytes]]:
    """Everything import and export are about: the view (task per id) and the history
    (raw bytes per event id). Receipt times and sources differ between stores on purpose."""
    async with opened(target) as store:
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


async def meta(target: Target, key: str) -> str | None:
    async with opened(target) as store:
        return await store.get_meta(key)
