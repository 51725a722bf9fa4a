"""How late an event loop runs what it was asked to run: the loop-lag figure.

A timer due every ``interval_s`` notes how late it fired. A loop that something blocks
(a handler calling ``time.sleep``, a CPU-heavy parse) fires it late, or not at all while
it is stuck, so :attr:`LoopLag.seconds` also counts the time the pending timer is
overdue: read from another thread, a stuck loop shows a lag that grows. The service
exposes one per loop (the receiver's, and each handler's) in ``/readyz`` and as
``phasewatch_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["LoopLag"]


class LoopLag:
    def __init__(self, interval_s: float = 0.25) -> None:
        self._interval = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # time.monotonic() at which the pending tick is due
        self._last = 0.0  # lag of the last tick
        self.worst = 0.0  # largest lag seen since start

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start measuring ``loop``; call from that loop's thread."""
        self._loop = loop
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop = None

    @property
    def seconds(self) -> float:
        """The loop's lag now: the last tick's, or longer if the next is overdue."""
        if self._loop is None:
            return 0.0
        return max(self._last, time.monotonic() - self._due, 0.0)

    def _schedule(self) -> None:
        assert self._loop is not None
        # time.monotonic, not loop.time(): read from other threads, and uvloop's clock
        # is its own.
        self._due = time.monotonic() + self._interval
        self._handle = self._loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        self._last = max(0.0, time.monotonic() - self._due)
        self.worst = max(self.worst, self._last)
        self._schedule()
