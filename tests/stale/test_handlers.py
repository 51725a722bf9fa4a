"""Stale alerts reaching handlers: ``@on(phase=..., stale_for=...)`` receives one
``kind="stale"`` change per stuck snapshot and nothing else, other handlers none; the
built-in log prints a stale line; the settings and ``on()`` refuse what cannot work, in
one line naming the variable."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from consumer.core.change import PhaseChange, stale_kind
from consumer.dispatch.dispatcher import Dispatcher
from consumer.service import Service
from consumer.settings import Settings, describe_invalid
from consumer.stale import StaleSweeper, parse_stale, watches_of
from consumer.store.base import Store
from consumer.store.memory import MemoryStore
from consumer.store.sqlite.store import SQLiteStore
from handlers import on
from handlers.builtin import from_settings
from handlers.subscribe import with_stale
from tests.stale.support import FIVE_MIN, put
from tests.support import wait_until


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "h.db")
    await s.open()
    yield s
    await s.close()


async def settled(store: Store, dispatcher: Dispatcher) -> None:
    """Every handler has resolved the whole outbox: nothing more can reach any."""

    async def resolved() -> bool:
        last = (await store.stats()).last_change_seq
        handlers: dict[str, Any] = dispatcher.status()["handlers"]
        return all(h["cursor"] == last and h["queued"] == 0 for h in handlers.values())

    await wait_until(resolved, "every handler to resolve the whole outbox")


async def test_on_stale_for_gets_one_stale_change_and_other_handlers_none(
    store: SQLiteStore,
) -> None:
    stale: list[PhaseChange] = []
    phases: list[PhaseChange] = []

    @on(phase="running", stale_for=300, name="stuck")
    async def stuck(change: PhaseChange) -> None:
        stale.append(change)

    @on(phase="running", stale_for=900, name="very-stuck")
    async def very_stuck(change: PhaseChange) -> None:
        stale.append(change)

    @on(name="every-change")
    async def every(change: PhaseChange) -> None:
        phases.append(change)

    assert watches_of([stuck, very_stuck, every]) == [("running", 300_000), ("running", 900_000)]
    now = 1_000
    sweep = StaleSweeper(store, watches_of([stuck, very_stuck, every]), clock=lambda: now)
    dispatcher = Dispatcher(store, [stuck, very_stuck, every], poll_s=0.05)
    await dispatcher.start()
    try:
        await put(store, "T", "running", 1_000)
        await put(store, "U", "running", 1_000)
        await put(store, "U", "completed", 2_000)
        now = 1_000 + FIVE_MIN
        await sweep.sweep_once()
        await sweep.sweep_once()  # again: nothing new
        dispatcher.notify([])
        await settled(store, dispatcher)
    finally:
        await dispatcher.stop()
    assert [(c.task_id, c.kind, c.phase, c.previous_phase, c.changed_at) for c in stale] == [
        ("T", "stale", "running", "running", 1_000)
    ]
    assert stale[0].idempotency_key.startswith("pw1_") and stale[0].event_id == "T-1000"
    assert sorted((c.task_id, c.kind, c.phase) for c in phases) == [
        ("T", "phase", "running"),
        ("U", "phase", "completed"),
        ("U", "phase", "running"),
    ]


def test_wants_takes_the_alerts_of_its_own_threshold_phase_and_types() -> None:
    @on(phase=["running", "waiting"], type="upload", stale_for=300)
    async def stuck(change: PhaseChange) -> None:
        del change

    assert stuck.stale_for == {"running": 300.0, "waiting": 300.0} and stuck.stale_only
    assert stuck.wants(stale_kind(300_000), "upload", "running", "running")
    assert stuck.wants("stale", "upload", "waiting", "waiting")  # a handler's view of one
    assert not stuck.wants(stale_kind(900_000), "upload", "running", "running")
    assert not stuck.wants(stale_kind(300_000), "export", "running", "running")
    assert not stuck.wants(stale_kind(300_000), "upload", "pending", "pending")
    assert not stuck.wants("phase", "upload", "waiting", "running")  # alerts only

    @on(phase="running")
    async def plain(change: PhaseChange) -> None:
        del change

    assert not plain.wants(stale_kind(300_000), "upload", "running", "running")
    both = with_stale(plain, {"running": 300})
    assert both.wants("phase", None, "waiting", "running")
    assert both.wants(stale_kind(300_000), None, "running", "running")
    assert with_stale(plain, {}) is plain


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stale_for": 300}, ValueError, "stale_for needs phase"),
        ({"phase": "running", "stale_for": 0}, ValueError, "positive number of seconds"),
        ({"phase": "running", "stale_for": -1}, ValueError, "positive number of seconds"),
        ({"phase": "running", "stale_for": float("inf")}, ValueError, "positive number"),
        ({"phase": "running", "stale_for": True}, TypeError, "number of seconds"),
        ({"phase": "running", "stale_for": "300"}, TypeError, "number of seconds"),
        ({"phase": "running", "stale_for": 300, "previous": "waiting"}, ValueError, "previous"),
        ({"phase": "running", "stale_for": 300, "updates": True}, ValueError, "updates"),
    ],
)
def test_on_refuses_a_stale_for_that_cannot_work(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        on(**kwargs)


def test_on_warns_about_a_stale_for_on_a_final_phase() -> None:
    with pytest.warns(UserWarning, match="every completed task will be alerted"):

        @on(phase="completed", stale_for=60)
        async def nag(change: PhaseChange) -> None:
            del change


def test_stale_settings_parse_and_refuse_in_one_line_naming_the_variable() -> None:
    settings = Settings(notify_stale=" running:300, waiting:1.5 ", log_stale="running:900")
    assert settings.notify_stale_for() == {"running": 300.0, "waiting": 1.5}
    assert settings.log_stale_for() == {"running": 900.0}
    assert parse_stale("") == {} and parse_stale(" , ") == {}
    for variable, value, expected in [
        ("notify_stale", "running", "item 1 is not phase:seconds"),
        ("notify_stale", "running:300,waiting", "item 2 is not phase:seconds"),
        ("log_stale", "running:soon", "item 1 (running): the seconds must be a number"),
        ("log_stale", "running:0", "must be positive"),
        ("log_stale", "running:300,running:900", "phase 'running' is given twice"),
        ("log_stale", ":300", "item 1 is not phase:seconds"),
    ]:
        given: dict[str, Any] = {variable: value}
        with pytest.raises(ValidationError) as raised:
            Settings(**given)
        line = describe_invalid(raised.value)
        assert line.startswith(f"PHASEWATCH_{variable.upper()}: ") and expected in line, line
        assert "\n" not in line


def test_notify_stale_needs_the_notifier() -> None:
    with pytest.raises(
        ValueError, match="PHASEWATCH_NOTIFY_STALE is set but PHASEWATCH_NOTIFY_URL"
    ):
        from_settings(Settings(notify_stale="running:300"))
    (notifier,) = from_settings(
        Settings(
            notify_url="http://127.0.0.1:9/hook",
            notify_secret="whsec_dGVzdA==",
            notify_phases="failed",
            notify_stale="running:300,waiting:600",
        )
    )
    assert notifier.name == "http-notify" and not notifier.stale_only
    assert notifier.stale_for == {"running": 300.0, "waiting": 600.0}
    assert notifier.phases == frozenset({"failed"}) and notifier.on_start is not None
    assert notifier.wants("phase", None, "running", "failed")
    assert notifier.wants(stale_kind(600_000), None, "waiting", "waiting")


def test_log_stale_alone_logs_only_alerts_and_with_log_changes_both() -> None:
    (alone,) = from_settings(Settings(log_stale="running:300"))
    assert alone.name == "log" and alone.stale_only
    assert not alone.wants("phase", None, "waiting", "running")
    (both,) = from_settings(Settings(log_stale="running:300", log_changes=True))
    assert not both.stale_only and both.wants("phase", None, "waiting", "running")
    assert both.wants(stale_kind(300_000), None, "running", "running")
    assert from_settings(Settings()) == []


async def test_the_builtin_log_prints_a_stale_line(
    store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    (log,) = from_settings(Settings(log_stale="running:300"))
    now = 1_000
    sweep = StaleSweeper(store, watches_of([log]), clock=lambda: now)
    dispatcher = Dispatcher(store, [log], poll_s=0.05)
    await dispatcher.start()
    lines: list[dict[str, Any]] = []

    def printed() -> list[dict[str, Any]]:
        out = capsys.readouterr().out
        lines.extend(orjson.loads(line) for line in out.splitlines() if line.strip())
        return lines

    try:
        await put(store, "T", "running", 1_000)
        now = 1_000 + FIVE_MIN
        await sweep.sweep_once()
        dispatcher.notify([])
        await wait_until(printed, "the log's stale line")
        await settled(store, dispatcher)
    finally:
        await dispatcher.stop()
    printed()
    assert len(lines) == 1  # the phase change to running is not logged: alerts alone
    (line,) = lines
    assert line["kind"] == "stale" and line["taskId"] == "T" and line["phase"] == "running"
    assert line["changedAt"] == 1_000 and line["idempotencyKey"].startswith("pw1_")


async def test_the_service_sweeps_for_its_handlers_and_shows_the_gauge() -> None:
    @on(phase="running", stale_for=300, name="stuck")
    async def stuck(change: PhaseChange) -> None:
        del change

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building the service warns about nothing here
        service = Service(Settings(database_url="memory://"), MemoryStore(), [stuck])
    assert service.stale.watches == [("running", 300_000)]
    await service.stale.count_once()
    status = await service.status()
    assert status["stale"]["staleTasks"] == {"running": 0} and not status["stale"]["leader"]
    plain = Service(Settings(database_url="memory://"), MemoryStore(), [])
    assert "stale" not in await plain.status()
