"""Tell coroutines on the event loop that the job's state changed in another thread.

The job calls ``notify_threadsafe`` (from any thread, with its lock held) after every change; a
coroutine takes ``next()`` *before* it looks at the job and then awaits it, so a change made
between its look and its wait is never missed.
"""

from __future__ import annotations

import asyncio
import contextlib


class Changes:
    """The next change of the job, as an ``asyncio.Event`` that is set when it happens."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._event = asyncio.Event()
        self._scheduled = False  # a wake-up is queued on the loop already: changes coalesce

    def next(self) -> asyncio.Event:
        """An event set at the first change after this call (call it on the loop)."""
        return self._event

    def notify_threadsafe(self) -> None:
        """Wake the loop's waiters soon; cheap and non-blocking, safe from any thread."""
        if self._scheduled:
            return
        self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._scheduled = False  # first: a change from now on queues another wake-up
        event, self._event = self._event, asyncio.Event()
        event.set()

    @staticmethod
    async def wait(event: asyncio.Event, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for ``event``; True when it was set."""
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True
