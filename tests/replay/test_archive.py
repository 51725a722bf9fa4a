"""``phasewatch import`` and ``export`` against real stores: the fixtures fold to the
expected tasks, re-imports change nothing, bad lines are reported by number, exports
round-trip, an interrupted import resumes where it stopped, and a history moves over
from SQLite to PostgreSQL unchanged. The tests with a ``new_db`` run on SQLite and on
PostgreSQL (``PHASEWATCH_DATABASE_URL`` naming either); the others on SQLite."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from consumer.cli import replay as cli_replay
from consumer.core.signature import verify
from consumer.replay.archive import checkpoint_key, import_archive
from consumer.replay.job import BatchHook
from consumer.store.base import Store
from consumer.store.sqlite.store import SQLiteStore
from tests.replay.support import Target, contents, meta, opened, parse, settings_for
from tests.support import FIXTURE_SECRET, FIXTURES, deliveries, expected_tasks

# Makes a new, empty store: a SQLite file's path or a PostgreSQL database's URL.
NewDb = Callable[[], Awaitable[Target]]


def fixture_copy(tmp_path: Path, name: str) -> Path:
    # A copy: the checkpoint key includes the mtime, and tests must not touch shared files.
    target = tmp_path / f"{name}.jsonl"
    shutil.copyfile(FIXTURES / name / "deliveries.jsonl", target)
    return target


def partial_files(directory: Path) -> list[Path]:
    return list(directory.glob("*.partial"))


def distinct(name: str) -> int:
    return len({d.doc["id"] for d in deliveries(name)})


async def run(db: Target, *argv: str, on_batch: BatchHook | None = None) -> int:
    """``phasewatch ARGV`` with ``PHASEWATCH_DATABASE_URL`` naming ``db``."""
    return await cli_replay.run(settings_for(db), parse(*argv), on_batch=on_batch)


@pytest.fixture(params=["sqlite", "postgres"])
def new_db(request: pytest.FixtureRequest, tmp_path: Path) -> NewDb:
    made: list[Target] = []

    async def make() -> Target:
        target: Target
        if request.param == "postgres":
            server = request.getfixturevalue("pg_server")
            server.ensure_running()
            target = await server.create_database()
        else:
            target = tmp_path / f"db{len(made)}.db"
        made.append(target)
        return target

    return make


@pytest.mark.parametrize("name", ["small", "messy"])
async def test_import_fixture_gives_expected_tasks(
    tmp_path: Path, new_db: NewDb, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = await new_db()
    assert await run(db, "import", str(fixture_copy(tmp_path, name))) == 0
    tasks, history = await contents(db)
    assert tasks == expected_tasks(name)
    assert len(history) == distinct(name)
    lines = len(deliveries(name))
    err = capsys.readouterr().err
    assert f"{distinct(name)} accepted, {lines - distinct(name)} duplicates, 0 rejected" in err
    async with opened(db) as store:
        sources = {e.source for e in await store.history_after(0, 100_000)}
        stats = await store.stats()
    assert sources == {"import"}
    assert (stats.events, stats.tasks) == (distinct(name), len(expected_tasks(name)))
    assert stats.changes == 0  # an import tells no handler about the past


async def test_import_twice_adds_nothing(
    tmp_path: Path, new_db: NewDb, capsys: pytest.CaptureFixture[str]
) -> None:
    db, archive = await new_db(), fixture_copy(tmp_path, "messy")
    assert await run(db, "import", str(archive)) == 0
    first = await contents(db)
    async with opened(db) as store:
        before = await store.stats()
    capsys.readouterr()
    assert await run(db, "import", str(archive)) == 0
    assert "0 accepted, 4317 duplicates" in capsys.readouterr().err
    assert await contents(db) == first
    async with opened(db) as store:
        after = await store.stats()
    # No event stored twice, no phase change recorded twice.
    assert (after.events, after.tasks, after.changes) == (
        before.events,
        before.tasks,
        before.changes,
    )
    assert after.last_event_seq == before.last_event_seq


async def test_bad_lines_are_reported_by_number_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = (FIXTURES / "small" / "deliveries.jsonl").read_bytes().splitlines()
    no_status = orjson.dumps({"id": "T-bad", "type": "upload"}).decode()
    bad = {
        3: b"{not json",
        10: b'{"signature": "t=1,v1=00"}',  # no body
        20: orjson.dumps({"signature": "", "body": "[1, 2"}),  # body is not JSON
        30: orjson.dumps({"signature": "", "body": no_status}),  # neither event nor task
        40: orjson.dumps(
            {
                "signature": "",
                "body": orjson.dumps(
                    {
                        "id": "e-bad",
                        "createdAt": 1,
                        "event": "task.updated",
                        "payload": {"task": {"id": "T-bad", "snapshot": {"id": "T-bad"}}},
                    }
                ).decode(),
            }
        ),  # a task event whose snapshot has no status
    }
    lines: list[bytes] = []
    for line in good:
        while len(lines) + 1 in bad:
            lines.append(bad[len(lines) + 1])
        lines.append(line)
    lines.insert(49, b"   ")  # line 50: blank lines are neither events nor errors
    archive = tmp_path / "bad.jsonl"
    archive.write_bytes(b"\n".join(lines))  # and no newline after the last line

    db = tmp_path / "a.db"
    assert await run(db, "import", str(archive), "--batch-size", "7") == 1
    err = capsys.readouterr().err
    assert f"{len(lines)} of {len(lines)} lines done" in err
    assert "5 rejected" in err
    for number, reason in [
        (3, "not_json"),
        (10, "not_a_delivery"),
        (20, "not_json"),
        (30, "not_an_event"),
        (40, "invalid_event"),
    ]:
        assert f"  line {number}: {reason}: " in err
    tasks, history = await contents(db)
    assert tasks == expected_tasks("small")  # the bad lines changed nothing
    assert len(history) == distinct("small") and "e-bad" not in history


async def test_verify_secret_rejects_a_tampered_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (FIXTURES / "small" / "deliveries.jsonl").read_bytes().splitlines()
    doc = orjson.loads(lines[4])
    tampered_body = doc["body"].replace('"phase":"', '"phase":"x', 1)
    assert tampered_body != doc["body"]
    lines[4] = orjson.dumps({"signature": doc["signature"], "body": tampered_body})
    archive = tmp_path / "tampered.jsonl"
    archive.write_bytes(b"\n".join(lines) + b"\n")

    db = tmp_path / "a.db"
    assert await run(db, "import", str(archive), "--verify-secret", "whsec_fixture") == 1
    err = capsys.readouterr().err
    assert "1 rejected" in err and "  line 5: bad_signature: " in err
    _, history = await contents(db)
    assert tampered_body.encode() not in history.values()

    # Without --verify-secret the archive is trusted: the tampered line goes in.
    trusting = tmp_path / "b.db"
    assert await run(trusting, "import", str(archive)) == 0
    _, history = await contents(trusting)
    assert tampered_body.encode() in history.values()

    # The wrong secret rejects every line.
    wrong = tmp_path / "c.db"
    assert await run(wrong, "import", str(archive), "--verify-secret", "whsec_other") == 1
    assert f"{len(lines)} rejected" in capsys.readouterr().err
    assert await contents(wrong) == ({}, {})


async def test_export_import_round_trip(tmp_path: Path, new_db: NewDb) -> None:
    a, b = await new_db(), await new_db()
    assert await run(a, "import", str(fixture_copy(tmp_path, "messy"))) == 0
    exported = tmp_path / "export.jsonl"
    assert await run(a, "export", "--output", str(exported)) == 0
    assert await run(b, "import", str(exported)) == 0
    assert await contents(b) == await contents(a)
    tasks, _ = await contents(b)
    assert tasks == expected_tasks("messy")
    again = tmp_path / "again.jsonl"
    assert await run(b, "export", "-o", str(again)) == 0
    assert again.read_bytes() == exported.read_bytes()  # same history, same order
    assert not partial_files(tmp_path)
    for line in exported.read_bytes().splitlines():
        assert orjson.loads(line)["signature"] == ""


async def test_export_signed_lines_match_livepeer_signatures(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    assert await run(db, "import", str(fixture_copy(tmp_path, "small"))) == 0
    exported = tmp_path / "signed.jsonl"
    assert await run(db, "export", "-o", str(exported), "--sign-secret", "whsec_fixture") == 0
    originals = {(d.signature, d.body) for d in deliveries("small")}
    lines = exported.read_bytes().splitlines()
    assert len(lines) == distinct("small")
    for line in lines:
        doc = orjson.loads(line)
        body = doc["body"].encode()
        # t is the body's own timestamp, so the line is the delivery Livepeer signed.
        assert (doc["signature"], body) in originals
        verify(doc["signature"], body, FIXTURE_SECRET, now_ms=0, tolerance_ms=0)
    verified = tmp_path / "b.db"
    args = ("import", str(exported), "--verify-secret", "whsec_fixture")
    assert await run(verified, *args) == 0


async def test_export_filters_by_task_and_time(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    assert await run(db, "import", str(fixture_copy(tmp_path, "messy"))) == 0
    store = SQLiteStore(db)
    await store.open()
    try:
        history = await store.history_after(0, 100_000)
    finally:
        await store.close()

    task_id = next(e.task_id for e in history if e.task_id is not None)
    one = tmp_path / "task.jsonl"
    assert await run(db, "export", "--task", task_id, "-o", str(one)) == 0
    bodies = [orjson.loads(line)["body"].encode() for line in one.read_bytes().splitlines()]
    assert bodies == [e.raw for e in history if e.task_id == task_id]

    created = sorted(e.created_at for e in history)
    since, until = int(created[len(created) // 4]), int(created[len(created) // 2])
    window = tmp_path / "window.jsonl"
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    since_text = (epoch + timedelta(milliseconds=since)).isoformat(timespec="milliseconds")
    argv = ("export", "--since", since_text, "--until", str(until), "-o", str(window))
    assert await run(db, *argv) == 0
    ids = [orjson.loads(orjson.loads(x)["body"])["id"] for x in window.read_bytes().splitlines()]
    assert ids == [e.event_id for e in history if since <= e.created_at <= until]
    assert 0 < len(ids) < len(history)

    assert await run(db, "export", "--since", str(until), "--until", str(since)) == 2


async def test_interrupted_import_resumes_where_it_stopped(
    tmp_path: Path, new_db: NewDb, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = fixture_copy(tmp_path, "messy")
    db = await new_db()

    def interrupt_after_three(batches: int) -> None:
        if batches == 3:
            raise KeyboardInterrupt

    argv = ("import", str(archive), "--batch-size", "500")
    assert await run(db, *argv, on_batch=interrupt_after_three) == 130
    err = capsys.readouterr().err
    assert "interrupted after line 1500 of 4317" in err and "run the same command again" in err
    saved = await meta(db, checkpoint_key(archive))
    assert saved is not None and orjson.loads(saved)["lines"] == 1500
    _, history = await contents(db)
    assert len(history) == len({d.doc["id"] for d in deliveries("messy")[:1500]})

    batches: list[int] = []
    assert await run(db, *argv, on_batch=batches.append) == 0
    err = capsys.readouterr().err
    assert "resumed after line 1500" in err and "4317 of 4317 lines done" in err
    assert len(batches) == 6  # (4317 - 1500) / 500 rounded up: the done lines were skipped
    assert await meta(db, checkpoint_key(archive)) is None

    straight = await new_db()
    assert await run(straight, "import", str(archive)) == 0
    assert await contents(db) == await contents(straight)
    tasks, _ = await contents(db)
    assert tasks == expected_tasks("messy")
    # Counts carried over by the checkpoint cover the whole file.
    assert f"{distinct('messy')} accepted, {4317 - distinct('messy')} duplicates" in err


async def test_ctrl_c_finishes_the_batch_and_saves_the_checkpoint(tmp_path: Path) -> None:
    archive = fixture_copy(tmp_path, "small")
    db = tmp_path / "a.db"
    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c(batches: int) -> None:
        if batches == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal, through run()'s handler

    argv = ("import", str(archive), "--batch-size", "20")
    assert await run(db, *argv, on_batch=press_ctrl_c) == 130
    assert signal.getsignal(signal.SIGINT) == before  # handler put back
    saved = await meta(db, checkpoint_key(archive))
    assert saved is not None
    done = orjson.loads(saved)["lines"]
    assert done % 20 == 0 and 40 <= done < len(deliveries("small"))
    assert await run(db, *argv) == 0
    tasks, _ = await contents(db)
    assert tasks == expected_tasks("small")


async def test_changed_file_starts_over(tmp_path: Path) -> None:
    archive = fixture_copy(tmp_path, "small")
    db = tmp_path / "a.db"

    def stop_at_once(batches: int) -> None:
        raise KeyboardInterrupt

    assert await run(db, "import", str(archive), "--batch-size", "50", on_batch=stop_at_once) == 130
    old_key = checkpoint_key(archive)
    with archive.open("ab") as more:
        more.write(b"\n")
    assert checkpoint_key(archive) != old_key  # size and mtime are part of the key
    store = SQLiteStore(db)
    await store.open()
    try:
        report = await import_archive(store, archive)
    finally:
        await store.close()
    assert report.resumed_at == 0 and not report.interrupted


async def test_interrupted_export_leaves_the_old_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "a.db"
    assert await run(db, "import", str(fixture_copy(tmp_path, "messy"))) == 0
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"previous export\n")

    def stop_at_once(pages: int) -> None:
        raise KeyboardInterrupt

    assert await run(db, "export", "-o", str(target), on_batch=stop_at_once) == 130
    assert "export always rewrites its output" in capsys.readouterr().err
    assert target.read_bytes() == b"previous export\n"
    assert not partial_files(tmp_path)
    assert await run(db, "export", "-o", str(target)) == 0
    assert len(target.read_bytes().splitlines()) == distinct("messy")


async def test_export_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "a.db"
    assert await run(db, "import", str(fixture_copy(tmp_path, "small"))) == 0
    capsys.readouterr()
    assert await run(db, "export") == 0
    # Progress and the summary go to stderr, so stdout is exactly the archive.
    out = capsys.readouterr().out
    assert len(out.splitlines()) == distinct("small")


async def all_task_ids(store: Store) -> list[str]:
    ids: list[str] = []
    while page := await store.task_ids_after(ids[-1] if ids else None, 100):
        ids.extend(page)
    return ids


async def test_history_moves_over_from_sqlite_to_postgres(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Moving over: export the SQLite store, import the file into PostgreSQL; every task
    and every task's history is the same on both, and exporting PostgreSQL gives the
    same file back."""
    sqlite_db = tmp_path / "old.db"
    assert await run(sqlite_db, "import", str(fixture_copy(tmp_path, "messy"))) == 0
    exported = tmp_path / "moving.jsonl"
    assert await run(sqlite_db, "export", "-o", str(exported)) == 0
    capsys.readouterr()
    assert await run(pg_url, "import", str(exported)) == 0
    # The export holds each event once: nothing is a duplicate on the way in.
    assert f"{distinct('messy')} accepted, 0 duplicates, 0 rejected" in capsys.readouterr().err

    async with opened(sqlite_db) as old, opened(pg_url) as new:
        assert type(new).__name__ == "PostgresStore"
        task_ids = await all_task_ids(old)
        assert task_ids == sorted(expected_tasks("messy"))
        assert await all_task_ids(new) == task_ids
        for task_id in task_ids:
            was, now = await old.get_task(task_id), await new.get_task(task_id)
            assert was is not None and now is not None
            assert now.task == was.task, task_id
            old_history = [(h.event_id, h.raw) for h in await old.task_history(task_id)]
            new_history = [(h.event_id, h.raw) for h in await new.task_history(task_id)]
            assert new_history == old_history, task_id
        # The whole history, in the same order, untasked events too.
        old_all = [(h.event_id, h.task_id, h.raw) for h in await old.history_after(0, 100_000)]
        new_all = [(h.event_id, h.task_id, h.raw) for h in await new.history_after(0, 100_000)]
        assert new_all == old_all
        was_stats, now_stats = await old.stats(), await new.stats()
        assert (now_stats.events, now_stats.tasks) == (was_stats.events, was_stats.tasks)

    back = tmp_path / "back.jsonl"
    assert await run(pg_url, "export", "-o", str(back)) == 0
    assert back.read_bytes() == exported.read_bytes()
