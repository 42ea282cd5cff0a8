"""An asyncio event loop in a thread of its own, driven from ordinary threads.

The gRPC server runs on this loop; the selector's producer, its ready watcher and whoever starts and
stops it are plain threads that hand coroutines over with ``run``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CLOSE_TIMEOUT = 10.0  # seconds close() waits for cancelled tasks to finish


class LoopClosed(RuntimeError):
    """The loop has been closed: nothing more runs on it."""


class EventLoopThread:
    """A running event loop and its daemon thread; ``close`` cancels what is left and ends both."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._closing = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (from any thread but the loop's own)."""
        if self._closing or not self._thread.is_alive():
            coro.close()
            raise LoopClosed("the event loop is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel every task still on the loop, then stop it and wait for its thread."""
        if self._closing:
            return
        try:
            self.run(_cancel_all(), timeout=CLOSE_TIMEOUT)
        except (LoopClosed, TimeoutError):
            pass
        self._closing = True
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CLOSE_TIMEOUT)


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
