"""A handler for the browser tests: every change it gets is refused with
:class:`~consumer.PermanentError` (a dead letter at once, its error naming the task)
until the file named by PHASEWATCH_TEST_ALLOW exists; from then on it accepts them, so
a re-driven dead letter ends ``done``. The path is read once, at import, like a user's
module would."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from consumer import PermanentError, PhaseChange

_ALLOW = Path(os.environ.get("PHASEWATCH_TEST_ALLOW", "/nonexistent/phasewatch-allow"))


async def refuse_until_allowed(change: PhaseChange) -> None:
    if not await asyncio.to_thread(_ALLOW.exists):
        raise PermanentError(f"refused {change.task_id} ({change.task.type}): not allowed yet")
