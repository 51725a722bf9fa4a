"""Run ``phasewatch serve`` as a real child process, for crash and CLI tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.support import REPO, wait_until_sync

PHASEWATCH = str(Path(sys.executable).with_name("phasewatch"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServiceProcess:
    def __init__(
        self,
        db: Path | str,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        cwd: Path = REPO,
        preexec: Callable[[], None] | None = None,
        log: Path | None = None,
        **extra: str,
    ) -> None:
        """``db``: a SQLite file (the log goes next to it, ``.log``), or a database URL
        such as ``postgresql://...`` (then ``log`` names the log file). ``env`` and
        ``extra`` are environment variables for the service, over ours; ``preexec`` runs
        in the child before it starts (limits, signal dispositions)."""
        self.cwd = cwd
        self.preexec = preexec
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if isinstance(db, Path):
            database_url = f"sqlite:///{db}"
            self.log = log or db.with_suffix(".log")
        elif log is None:
            raise ValueError("a service on a database URL needs a log path (log=...)")
        else:
            database_url, self.log = db, log
        self.env = {
            **os.environ,
            "PHASEWATCH_DATABASE_URL": database_url,
            "PHASEWATCH_HTTP_HOST": "127.0.0.1",
            "PHASEWATCH_HTTP_PORT": str(self.port),
            "PYTHONPATH": str(REPO),
            **(env or {}),
            **extra,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> ServiceProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [PHASEWATCH, "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                preexec_fn=self.preexec,  # noqa: PLW1509 - limits for this child only
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"phasewatch exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        try:
            wait_until_sync(ready, f"phasewatch at {self.url} to be ready", timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()[-2000:]}") from None
        return self

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """``GET path``: the status and the JSON body, whatever the status."""
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def post(self, path: str, body: bytes, timeout: float = 10) -> int:
        """``POST path`` with ``body``; the status (a timeout raises)."""
        request = urllib.request.Request(f"{self.url}{path}", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
