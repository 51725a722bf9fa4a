"""``phasewatch reconcile``: one pass, a summary, exit statuses; end to end as a user runs
it (a child process against the stand-in), and in process for Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import pytest

from consumer.cli import reconcile as cli_reconcile
from consumer.settings import Settings
from consumer.store.sqlite.store import SQLiteStore
from tests.process.service_proc import PHASEWATCH
from tests.reconcile.studio_standin import StudioStandin, task
from tests.support import REPO

B = 1_750_000_000_000


async def phasewatch(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the command while this loop keeps serving the stand-in."""
    proc = await asyncio.create_subprocess_exec(
        PHASEWATCH,
        *args,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_the_command_runs_a_pass_and_prints_the_summary(
    studio: StudioStandin, tmp_path: Path
) -> None:
    studio.put(*(task(f"T{i:02}", "completed", B + i) for i in range(10)))
    env = {
        "PHASEWATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'pw.db'}",
        "PHASEWATCH_LIVEPEER_API_KEY": studio.api_key,
        "PHASEWATCH_LIVEPEER_API_URL": studio.url,
    }
    status, out, err = await phasewatch("reconcile", "--since", "2025-06-15T15:06:40Z", env=env)
    assert status == 0, err
    assert "reconcile: 2 pages, 10 tasks seen, 10 tasks repaired (10 snapshots new" in err
    assert studio.api_key not in out + err

    status, _, err = await phasewatch("reconcile", env=env)  # from the saved watermark
    assert status == 0, err
    assert "10 tasks seen, 0 tasks repaired (0 snapshots new" in err

    status, out, _ = await phasewatch("tasks", "get", "T03", env=env)
    assert status == 0 and '"completed"' in out

    refused = {**env, "PHASEWATCH_LIVEPEER_API_KEY": "sk_refused_0123456789"}
    status, out, err = await phasewatch("reconcile", env=refused)
    assert status == 2
    assert err.strip().splitlines() == [
        f"phasewatch: Livepeer Studio refused the API key (HTTP 401 from {studio.url}/task):"
        " check PHASEWATCH_LIVEPEER_API_KEY"
    ]
    assert "sk_refused" not in out + err

    no_key = {k: v for k, v in env.items() if k != "PHASEWATCH_LIVEPEER_API_KEY"}
    no_key["PHASEWATCH_LIVEPEER_API_KEY"] = ""
    status, _, err = await phasewatch("reconcile", env=no_key)
    assert status == 2 and "PHASEWATCH_LIVEPEER_API_KEY" in err


async def test_ctrl_c_stops_after_the_page_and_a_rerun_goes_on(
    studio: StudioStandin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    studio.put(*(task(f"T{i:02}", "completed", B + i) for i in range(20)))
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'pw.db'}",
        livepeer_api_key=studio.api_key,
        livepeer_api_url=studio.url,
        reconcile_overlap_s=0,
    )

    def interrupt(batches: int) -> None:
        raise KeyboardInterrupt

    args = argparse.Namespace(since=B)
    assert await cli_reconcile.run(settings, args, on_batch=interrupt) == 130
    err = capsys.readouterr().err
    assert "reconcile: 1 page, 7 tasks seen, 7 tasks repaired" in err
    assert "run the same command again" in err

    assert await cli_reconcile.run(settings, argparse.Namespace(since=None)) == 0
    # T06 again (a duplicate: the watermark), then the 13 left.
    assert "14 tasks seen, 13 tasks repaired" in capsys.readouterr().err
    store = SQLiteStore(tmp_path / "pw.db")
    await store.open()
    try:
        assert (await store.stats()).tasks == 20
    finally:
        await store.close()
