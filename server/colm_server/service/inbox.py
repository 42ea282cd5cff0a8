"""Read a call's messages with a deadline on each wait, and count the calls waiting on clients.

A message is read only when the handler asks for the next one (nothing is read ahead, so gRPC
flow control holds a fast client back), and the wait for it has a timeout that a stalled client
cannot outlast.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import grpc


class NotReceived(Exception):
    """The client did not send the awaited message in time."""

    def __init__(self, what: str, seconds: float):
        super().__init__(f"{what} was not received within {seconds:g} s")


class Waiting:
    """How many calls wait on their clients right now, by what they wait for (thread-safe)."""

    def __init__(self):
        self._counts: Counter[str] = Counter()
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def on(self, what: str) -> Iterator[None]:
        """Count the calling code as waiting for ``what`` while inside the block."""
        with self._cond:
            self._counts[what] += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._counts[what] -= 1
                self._cond.notify_all()

    def counts(self) -> dict[str, int]:
        with self._cond:
            return dict(self._counts)

    def wait_for(self, predicate: Callable[[dict[str, int]], bool], timeout: float) -> bool:
        """Block until ``predicate(counts)`` holds; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(dict(self._counts)), timeout)


class Inbox:
    """The messages of one call, read one at a time when asked for; None at the client's half-close."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._read: asyncio.Future | None = None  # the read under way, kept over a timed-out wait

    async def next(self, timeout: float | None = None, what: str = "the next message"):
        """The next message, or None once the client half-closed; NotReceived after ``timeout`` s."""
        if self._read is None:
            self._read = asyncio.ensure_future(self._context.read())
        done, _ = await asyncio.wait({self._read}, timeout=timeout)
        if not done:
            raise NotReceived(what, timeout)
        read, self._read = self._read, None
        message = read.result()  # a broken call raises here
        return None if message is grpc.aio.EOF else message

    def close(self) -> None:
        """Stop reading (the call is over or being ended)."""
        if self._read is not None:
            self._read.cancel()
