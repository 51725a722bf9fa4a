"""Each handler runs on a thread and event loop of its own, never on the receiver's.

A handler is user code. One that blocks its thread (``time.sleep``, a synchronous HTTP
client, a slow DNS lookup) or hogs its loop would, on the service's own loop, stall the
webhook receiver: Livepeer times out after 30 s and retries for a day. Here every call of
a handler (and its ``on_start`` and ``on_stop``) is a coroutine scheduled on that
handler's :class:`HandlerThread`, and the dispatcher only awaits its outcome. So a
handler that blocks holds up its own deliveries, which time out and are retried like
any failure, and nothing else. (CPU a handler burns in Python still competes for the
interpreter lock; a handler with heavy work should hand it to a process pool.)

A handler that raises ``SystemExit``, ``KeyboardInterrupt`` or any other
``BaseException`` fails that delivery like any error (:class:`HandlerExit`): it is
retried and dead-lettered, and the service never exits because of a handler. Only
``os._exit`` and signals can still end the process.

Because a handler runs on its own loop, asyncio objects it shares with code on other
loops (events, queues, locks, sessions made elsewhere) do not work across: a handler
keeps its resources to itself, opening them in ``on_start`` or on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from consumer.lag import LoopLag

__all__ = ["HandlerExit", "HandlerThread"]

log = logging.getLogger(__name__)


class HandlerExit(Exception):
    """A handler raised a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``...): a failed delivery, not a reason to stop the service."""


async def _guarded(call: Callable[[], Awaitable[Any]]) -> None:
    try:
        await call()
    except (asyncio.CancelledError, Exception):
        raise
    except BaseException as exc:
        # Caught inside the coroutine: asyncio re-raises SystemExit and KeyboardInterrupt
        # out of the loop that runs the task, which would end the handler's thread.
        raise HandlerExit(f"the handler raised {type(exc).__name__}: {exc}") from exc


class HandlerThread:
    """One handler's thread and event loop. Start it, :meth:`run` calls on it from any
    other loop, stop it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.lag = LoopLag()

    def start(self) -> None:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self.lag.start(loop)
            ready.set()
            try:
                loop.run_forever()
            finally:
                self.lag.stop()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        # A daemon: a handler stuck in a blocking call must not keep the process alive
        # once the service has stopped.
        self._thread = threading.Thread(target=main, name=f"handler-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()

    async def run(self, call: Callable[[], Awaitable[Any]], timeout_s: float | None) -> None:
        """Run ``call()`` on this handler's loop and wait for it, at most ``timeout_s``
        (then it is cancelled there and ``TimeoutError`` raised here)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            raise RuntimeError(f"handler thread {self.name} is not running")
        future = asyncio.run_coroutine_threadsafe(_guarded(call), loop)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except BaseException:
            future.cancel()  # the call goes on no longer than the loop takes to notice
            raise

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop, and wait up to ``timeout_s`` for the thread (a handler stuck in
        a blocking call is left behind: the thread is a daemon)."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout_s)
        if thread.is_alive():
            log.warning("handler %s did not stop within %.0f s; left behind", self.name, timeout_s)
