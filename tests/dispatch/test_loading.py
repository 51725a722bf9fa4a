"""``PHASEWATCH_HANDLERS`` as a user meets it, through the real ``phasewatch serve``: a
module next to where it is run is found (as uvicorn and gunicorn find theirs), and a
reference that cannot be used is one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PHASEWATCH = str(Path(sys.executable).with_name("phasewatch"))
TIMEOUT_S = 60.0  # reached only when the behaviour is broken

MODULE = """\
from pathlib import Path

from handlers import PhaseChange, on

Path("imported").write_text(__file__)  # proof of which file was imported

@on(phase="completed")
async def publish(change: PhaseChange) -> None:
    del change

NOT_A_HANDLER = 3

def sync(change: PhaseChange) -> None:
    del change
"""
RAISING = """\
raise RuntimeError("bad config in my module\\nsecond line of the message")
"""


def environment() -> dict[str, str]:
    """This machine's environment without any phasewatch setting, nor a PYTHONPATH that
    would make the working directory importable by other means."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PHASEWATCH_") and k != "PYTHONPATH"
    }
    env.update(PHASEWATCH_DATABASE_URL="memory://", PHASEWATCH_HTTP_PORT="0")
    return env


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "myhooks.py").write_text(MODULE)
    (tmp_path / "raising.py").write_text(RAISING)
    return tmp_path


def test_a_module_in_the_working_directory_is_found(cwd: Path) -> None:
    env = {**environment(), "PHASEWATCH_HANDLERS": "myhooks:publish"}
    proc = subprocess.Popen(
        [PHASEWATCH, "serve"], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put("")  # end of output: the process exited

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        while not any("listening on" in line for line in seen):
            line = lines.get(timeout=TIMEOUT_S)
            assert line, f"phasewatch exited before serving: {''.join(seen)}"
            seen.append(line)
        assert "1 handler(s)" in seen[-1]
        assert (cwd / "imported").read_text() == str(cwd / "myhooks.py")
    finally:
        # Its exit status is not this test's business (tests/process covers a graceful
        # stop): SIGTERM may arrive before serve() installs its handler.
        proc.terminate()
        proc.wait(timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("nothere:publish", "no module named 'nothere'"),
        ("myhooks:nope", "no attribute 'nope'"),
        ("myhooks:NOT_A_HANDLER", "is not a handler"),
        ("myhooks:sync", "must be an async callable"),
        ("raising:anything", "RuntimeError: bad config in my module second line"),
        ("myhooks", "not a module:attribute reference"),
    ],
)
def test_a_bad_reference_is_one_line_and_status_2(cwd: Path, ref: str, says: str) -> None:
    result = subprocess.run(
        [PHASEWATCH, "serve"],
        cwd=cwd,
        env={**environment(), "PHASEWATCH_HANDLERS": ref},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    line = result.stderr.rstrip("\n")
    assert line.startswith("phasewatch: PHASEWATCH_HANDLERS: ")
    assert repr(ref) in line and says in line
    assert "Traceback" not in result.stderr
