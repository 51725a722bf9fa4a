"""A handler that blocks its thread for 2 s per change (``time.sleep`` in an async
handler, like a synchronous HTTP client would): the load of
``blocking_handler_bench.py``. Reference: ``blocking_handler:block``."""

from __future__ import annotations

import time

from handlers import PhaseChange, on


@on(timeout_s=30)
async def block(change: PhaseChange) -> None:
    del change
    time.sleep(2)  # noqa: ASYNC251 - the point: a handler that blocks its thread
