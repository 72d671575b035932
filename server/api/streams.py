"""Client streams that go quiet: the request iterator of a streaming RPC, ended with
StreamIdleError (DEADLINE_EXCEEDED) when the client sends nothing for too long.

Only the time spent waiting for the client counts: while the servicer works on a message (or
grpc holds the next one back because the servicer has not asked for it), the stream is not idle.
One watchdog task per stream sleeps on the server's clock until the current wait could have
lasted the limit, so a stream of 50 messages a second costs no timer per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

from server.errors import StreamIdleError
from server.runtime.clock import Clock

T = TypeVar("T")


class _IdleWatch:
    """When the current wait for a message began, and who waits; cancels the waiter once the
    wait has lasted `idle_seconds`."""

    def __init__(self, clock: Clock, idle_seconds: float) -> None:
        self._clock = clock
        self._idle_seconds = idle_seconds
        self._waiter: asyncio.Task[object] | None = None
        self._waiting_since = 0.0
        self.expired = False

    def waiting(self) -> None:
        self._waiter = asyncio.current_task()
        self._waiting_since = self._clock.monotonic()

    def received(self) -> None:
        self._waiter = None

    async def run(self) -> None:
        clock = self._clock
        while True:
            start = self._waiting_since if self._waiter is not None else clock.monotonic()
            await clock.sleep_until(start + self._idle_seconds)
            waiter = self._waiter
            if waiter is not None and clock.monotonic() - self._waiting_since >= self._idle_seconds:
                self.expired = True
                waiter.cancel()
                return


async def idle_limited(
    requests: AsyncIterable[T], idle_seconds: float, clock: Clock, *, closing: str
) -> AsyncIterator[T]:
    """`requests`, ending with StreamIdleError(`closing`) after `idle_seconds` without one.

    Iterate it from any task (a servicer may read the first message itself and hand the rest
    to a reader task): the watchdog interrupts whichever task is waiting. It stops when the
    stream ends or the task that first read from it (the call's handler) finishes."""
    messages = aiter(requests)
    watch = _IdleWatch(clock, idle_seconds)
    watchdog = asyncio.create_task(watch.run(), name="idle-stream-watchdog")
    # A servicer that stops reading early (it refused a message) leaves this generator
    # suspended, unclosed; the watchdog still ends with the call that opened the stream.
    opener = asyncio.current_task()
    if opener is not None:
        opener.add_done_callback(lambda _: watchdog.cancel())
    try:
        while True:
            watch.waiting()
            try:
                message = await anext(messages)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                # Only the watchdog's cancellation becomes the idle error; the client going
                # away or the server stopping cancels the call as before.
                if watch.expired and task is not None and task.uncancel() == 0:
                    raise StreamIdleError(closing) from None
                raise
            finally:
                watch.received()
            yield message
    finally:
        watchdog.cancel()
