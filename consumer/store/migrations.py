"""Versioned schema migrations, the shape every durable backend shares.

A backend keeps an ordered list of :class:`Migration` steps, numbered 1, 2, 3 ... with
no gaps. A database records the version it is at; opening the store (``serve``, any CLI
command) or ``phasewatch migrate`` applies the steps past it, each in its own
transaction together with the new version number, under the backend's lock (an advisory
lock on PostgreSQL, the write lock on SQLite), so replicas starting together migrate
once. A database *newer* than this code is refused: an older phasewatch must not write
into a schema it does not know.

Pure: no I/O here; the backends run the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Migration", "check_steps", "pending", "too_new"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # what it does, for the log and `phasewatch migrate`
    sql: str  # one or more statements, run in one transaction


def check_steps(steps: Sequence[Migration]) -> None:
    """Raise if the steps are not numbered 1..n in order (a mistake in this code)."""
    versions = [m.version for m in steps]
    if versions != list(range(1, len(steps) + 1)):
        raise AssertionError(f"migrations must be numbered 1..n in order, got {versions}")


def pending(steps: Sequence[Migration], current: int) -> list[Migration]:
    """The steps a database at version ``current`` still needs, in order."""
    return [m for m in steps if m.version > current]


def too_new(where: str, current: int, steps: Sequence[Migration]) -> str | None:
    """The one-line refusal for a database newer than this code, or None."""
    latest = len(steps)
    if current <= latest:
        return None
    return (
        f"{where} holds phasewatch schema {current}, newer than this version's {latest}:"
        " run the phasewatch that migrated it (or a newer one)"
    )
