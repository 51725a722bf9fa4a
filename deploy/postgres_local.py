#!/usr/bin/env python3
"""Run a real PostgreSQL server from the machine's own binaries, without Docker.

Role in phasewatch: the one place that knows how to get a genuine PostgreSQL on a machine
that has the server package (Debian's ``postgresql``) but no Docker engine. Stdlib only,
like ``deploy/kafka_local.py``, so the test fixture (``tests/pg_fixtures.py``), the
benchmarks and a developer can all load it without installing anything:

    python deploy/postgres_local.py start --port 5432
    # prints PHASEWATCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/phasewatch

The server refuses to run as root, so as root every server command runs as the
``postgres`` system user (``runuser``) on a directory that user owns. ``fsync`` stays on:
tests and benchmarks here speak about durability.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["LocalPostgres", "find_bindir"]


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: ``PG_BINDIR``, Debian's
    ``/usr/lib/postgresql/<major>/bin`` (newest), or ``PATH``."""
    explicit = os.environ.get("PG_BINDIR")
    if explicit:
        return Path(explicit)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise FileNotFoundError(
        "no PostgreSQL server binaries (initdb): install the server package"
        " (apt-get install -y postgresql) or set PG_BINDIR"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """One server on a loopback port, in a temporary directory it deletes on close."""

    def __init__(self, port: int | None = None, *, root: Path | None = None) -> None:
        self.bindir = find_bindir()
        self.port = port or _free_port()
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="phasewatch-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        """The server's ``postgres`` database, for administration."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        if self._as_postgres:
            # The server runs as `postgres`: it must own its directory.
            shutil.chown(self.root, "postgres")
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c max_connections=200 -c fsync=on"
        )
        try:
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                "60",
                "start",
                "-o",
                options,
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                f"PostgreSQL did not start: {exc.stderr}\n{self.log_tail()}"
            ) from exc

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: a clean stop; ``immediate``: like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url_for(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start"])
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--database", default="phasewatch")
    args = parser.parse_args()
    server = LocalPostgres(args.port)
    server.start()
    url = server.create_database(args.database)
    print(f"PHASEWATCH_DATABASE_URL={url}", flush=True)
    print("(data is temporary and removed on Ctrl-C)", file=sys.stderr, flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
